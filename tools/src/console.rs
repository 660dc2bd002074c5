//! Terminal output: the migration progress bar, the summary, and serial output that does
//! not tear the bar.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_engine::report::{Phase, ProgressEvent};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where lines for the user go: through the progress bar while one is shown, else stderr.
#[derive(Clone, Default)]
pub struct Console {
    bar: Arc<Mutex<Option<ProgressBar>>>,
}

impl Console {
    /// Prints a line above the bar (or plainly when there is none).
    pub fn line(&self, s: &str) {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match bar.as_ref() {
            Some(b) if !b.is_hidden() => b.println(s),
            _ => eprintln!("{s}"),
        }
    }

    /// A writer for a VM's serial port that goes through this console.
    pub fn serial_sink(&self) -> Box<dyn Write + Send> {
        Box::new(ConsoleWriter {
            console: self.clone(),
            buf: Vec::new(),
        })
    }

    /// Starts the progress bar (hidden when stderr is not a terminal).
    pub fn start_bar(&self) {
        let b = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{prefix:>13} [{bar:30}] {percent:>3}% {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
    }

    /// Updates the bar from a progress event.
    pub fn progress(&self, ev: &ProgressEvent) {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = bar.as_ref() else { return };
        b.set_prefix(ev.phase.name());
        b.set_position((ev.fraction.clamp(0.0, 1.0) * 1000.0) as u64);
        let eta = match ev.eta_ms {
            Some(ms) if matches!(ev.phase, Phase::Setup | Phase::Live) && ms < 1e9 => {
                match ev.eta_range_ms {
                    Some([least, most]) if most < 1e9 => format!(
                        ", ETA {:.1} s ({:.1}–{:.1})",
                        ms / 1e3,
                        least / 1e3,
                        most / 1e3
                    ),
                    _ => format!(", ETA {:.1} s", ms / 1e3),
                }
            }
            _ => String::new(),
        };
        let bound = ev
            .bound_ms
            .map(|b| format!(", bound {:.1} s", b / 1e3))
            .unwrap_or_default();
        b.set_message(format!(
            "{:.1} MiB sent, {:.1} MiB/s, epoch {}, {} never-sent, {} dirty{}{}",
            ev.wire_bytes as f64 / (1 << 20) as f64,
            ev.bytes_per_s / (1 << 20) as f64,
            ev.epoch,
            ev.never_sent_pages,
            ev.dirty_pages,
            eta,
            bound
        ));
    }

    /// Removes the bar, leaving its last state on screen.
    pub fn finish_bar(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish();
        }
    }
}

struct ConsoleWriter {
    console: Console,
    buf: Vec<u8>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            self.console
                .line(String::from_utf8_lossy(&line[..line.len() - 1]).as_ref());
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
