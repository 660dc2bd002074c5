//! The guest program's x86-64 machine code, generated with iced-x86's code assembler.
//!
//! One program serves every workload: it reads the parameter block at boot and jumps to the
//! workload's loop. On this project's KVM (a PVM flavour) guest code runs largely under
//! emulation at a few hundred nanoseconds per instruction, and a call/return pair costs as
//! much as five instructions, so each loop's step is written out inline with as few
//! instructions as possible (about 18 for `dirty-all` and `seq`, 30 for `random`); the
//! rare paths (clock, pacing, reports, failed or first-time checks) are subroutines.
//!
//! Registers held for the whole run:
//!
//! | reg | meaning |
//! |---|---|
//! | r15 | this vCPU's block |
//! | r14 | hot pages (clamped to the share, at least 1) |
//! | r13 | ledger entry of the share's first page |
//! | r12 | gpa of the share's first page |
//! | r11 | pages in the share |
//! | r10 | working-set pages (clamped to the share, at least 1) |
//! | r9  | [`HEADER_SIG`] |
//! | r8  | steps left until the next clock read (`pace`) |
//! | rbp | the frame: TSC ticks per step, pacing deadline, next report time, steps per clock read, sleep flag |
//! | rbx | xorshift64 state (`random`, `hotcold`) |
//! | rcx, rdx | the current page's gpa and ledger entry |
//! | rsi | end of the swept ledger entries (`idle`, `dirty-all`, `seq`) |
//!
//! `rax` and `rdi` are scratch.
//!
//! **Sleeping.** When the parameter block has a timer period (the VMM sets one for every
//! rate-limited run) and CPUID reports x2APIC, each vCPU at boot loads the shared GDT and
//! IDT of the descriptor page, switches its local APIC to x2APIC mode, enables it (spurious
//! vector [`SPURIOUS_VECTOR`]) and starts its timer, periodic on [`TIMER_VECTOR`] with
//! divide-by-1. Interrupts stay masked (IF = 0) except across the `sti; hlt` in `pace`:
//! `sti` holds interrupts off for one more instruction, so a tick that arrives before the
//! `hlt` is pending and ends it at once, and none is lost. The timer's handler counts the
//! wake-up in the vCPU's block (r15, which it relies on), writes the x2APIC EOI MSR and
//! returns; `pace` then re-reads the clock. Without x2APIC or a period the vCPU spins with
//! `PAUSE` as before. Everything the sleep depends on (IDTR and GDTR in the special
//! registers, the APIC base, the LAPIC registers and its running timer, a halted vCPU's MP
//! state) is vCPU state that a VMM saves and restores, so a restored guest keeps waking.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::layout::{
    param, vcpu_block, CODE_GPA, GDTR_GPA, HEADER_SIG, IDTR_GPA, PARAM_GPA, SPURIOUS_VECTOR,
    TIMER_VECTOR, VCPU_BLOCKS_GPA,
};
use super::GuestError;

/// COM1's data port.
const COM1: i32 = 0x3f8;
/// Step rate of `idle` when no rate is given.
pub(crate) const IDLE_DEFAULT_RATE: u64 = 1000;
/// Steps between clock reads when not rate limited.
const TIME_EVERY: i32 = 64;
/// xorshift64 state used when `seed ^ vcpu` is zero.
const FALLBACK_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Frame slots (offsets from rbp).
const F_TICKS: i32 = 0;
const F_DEADLINE: i32 = 8;
const F_NEXT_REPORT: i32 = 16;
const F_EVERY: i32 = 24;
/// 1 when the vCPU waits in `hlt` for its timer, 0 when it spins.
const F_SLEEP: i32 = 32;
const FRAME: i32 = 48;

/// x2APIC MSRs and bits.
const MSR_APIC_BASE: i32 = 0x1b;
const APIC_BASE_ENABLE_X2APIC: i32 = 0xc00;
const MSR_X2APIC_EOI: i32 = 0x80b;
const MSR_X2APIC_SVR: i32 = 0x80f;
const MSR_X2APIC_LVT_TIMER: i32 = 0x832;
const MSR_X2APIC_INIT_COUNT: i32 = 0x838;
const MSR_X2APIC_DIV_CONF: i32 = 0x83e;
const SVR_APIC_ENABLE: i32 = 0x100;
const LVT_TIMER_PERIODIC: i32 = 1 << 17;
/// Divide configuration "divide by 1".
const DIV_BY_1: i32 = 0xb;
/// CPUID.1:ECX bit of x2APIC.
const CPUID_X2APIC_BIT: i32 = 21;

/// Absolute address of a parameter block field.
fn p(off: u64) -> AsmMemoryOperand {
    qword_ptr(PARAM_GPA + off)
}

/// Field `off` of this vCPU's block (r15).
fn v(off: u64) -> AsmMemoryOperand {
    qword_ptr(r15 + off as i32)
}

/// Frame slot `off`.
fn f(off: i32) -> AsmMemoryOperand {
    qword_ptr(rbp + off)
}

struct Labels {
    pace: CodeLabel,
    timer_isr: CodeLabel,
    spurious_isr: CodeLabel,
    check_slow: CodeLabel,
    check_slow_w: CodeLabel,
    report: CodeLabel,
    puts: CodeLabel,
    putdec: CodeLabel,
    s_vcpu: CodeLabel,
    s_writes: CodeLabel,
    s_checks: CodeLabel,
    s_fails: CodeLabel,
    s_fail: CodeLabel,
    s_page: CodeLabel,
}

/// The assembled guest program.
pub(crate) struct Program {
    /// Machine code for [`CODE_GPA`].
    pub code: Vec<u8>,
    /// Address of the local APIC timer's interrupt handler.
    pub timer_isr: u64,
    /// Address of the spurious-interrupt handler.
    pub spurious_isr: u64,
}

/// Assembles the guest program for [`CODE_GPA`].
pub(crate) fn program() -> Result<Program, GuestError> {
    build().map_err(GuestError::Assemble)
}

fn build() -> Result<Program, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut l = Labels {
        pace: a.create_label(),
        timer_isr: a.create_label(),
        spurious_isr: a.create_label(),
        check_slow: a.create_label(),
        check_slow_w: a.create_label(),
        report: a.create_label(),
        puts: a.create_label(),
        putdec: a.create_label(),
        s_vcpu: a.create_label(),
        s_writes: a.create_label(),
        s_checks: a.create_label(),
        s_fails: a.create_label(),
        s_fail: a.create_label(),
        s_page: a.create_label(),
    };
    entry(&mut a, &l)?;
    pace(&mut a, &mut l)?;
    check_slow(&mut a, &mut l)?;
    report(&mut a, &mut l)?;
    puts(&mut a, &mut l)?;
    putdec(&mut a, &mut l)?;
    isrs(&mut a, &mut l)?;
    strings(&mut a, &mut l)?;
    let r = a.assemble_options(
        CODE_GPA,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    Ok(Program {
        timer_isr: r.label_ip(&l.timer_isr)?,
        spurious_isr: r.label_ip(&l.spurious_isr)?,
        code: r.inner.code_buffer,
    })
}

/// Boot: derive the per-vCPU registers from the parameter block, then jump to the
/// workload's loop.
fn entry(a: &mut CodeAssembler, l: &Labels) -> Result<(), IcedError> {
    a.sub(rsp, FRAME)?;
    a.mov(rbp, rsp)?;
    // r15 = this vCPU's block; remember the index there for messages.
    a.mov(r15, rdi)?;
    a.shl(r15, 6)?;
    a.add(r15, VCPU_BLOCKS_GPA as i32)?;
    a.mov(v(vcpu_block::INDEX), rdi)?;
    timer_setup(a)?;
    // Share: r11 = pages, r12 = gpa of the first page, r13 = its ledger entry.
    a.mov(r11, v(vcpu_block::PAGES))?;
    a.mov(rax, v(vcpu_block::FIRST_PAGE))?;
    a.mov(r13, p(param::LEDGER))?;
    a.lea(r13, r13 + rax * 4)?;
    a.mov(r12, rax)?;
    a.shl(r12, 12)?;
    a.add(r12, p(param::DATA_START))?;
    // r10 = working set, r14 = hot set: each clamped to the share and at least one page.
    for (reg, reg32, off) in [(r10, r10d, param::WSS_PAGES), (r14, r14d, param::HOT_PAGES)] {
        let mut nonzero = a.create_label();
        a.mov(reg, p(off))?;
        a.cmp(reg, r11)?;
        a.cmova(reg, r11)?;
        a.test(reg, reg)?;
        a.jnz(nonzero)?;
        a.mov(reg32, 1)?;
        a.set_label(&mut nonzero)?;
    }
    a.mov(r9, HEADER_SIG)?;
    // Ticks per step = tsc_khz * 1000 / rate (idle: 1000/s when no rate is given); the
    // clock is read every step when rate limited, every TIME_EVERY steps otherwise.
    let mut rate_set = a.create_label();
    let mut paced = a.create_label();
    a.mov(rdi, p(param::WORKLOAD))?;
    a.mov(rcx, p(param::RATE))?;
    a.test(rcx, rcx)?;
    a.jnz(rate_set)?;
    a.test(rdi, rdi)?;
    a.jnz(rate_set)?;
    a.mov(ecx, IDLE_DEFAULT_RATE as i32)?;
    a.set_label(&mut rate_set)?;
    a.mov(f(F_TICKS), 0)?;
    a.mov(f(F_EVERY), TIME_EVERY)?;
    a.test(rcx, rcx)?;
    a.jz(paced)?;
    a.mov(rax, p(param::TSC_KHZ))?;
    a.imul_3(rax, rax, 1000)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.mov(f(F_TICKS), rax)?;
    // A rate above the TSC frequency is no limit.
    a.test(rax, rax)?;
    a.jz(paced)?;
    a.mov(f(F_EVERY), 1)?;
    a.set_label(&mut paced)?;
    // The first step reads the clock; its deadline is now; the first report one interval on.
    a.mov(r8d, 1)?;
    rdtsc(a)?;
    a.mov(f(F_DEADLINE), rax)?;
    a.add(rax, p(param::REPORT_TICKS))?;
    a.mov(f(F_NEXT_REPORT), rax)?;
    // rbx = xorshift state seed ^ vcpu (never zero).
    let mut seeded = a.create_label();
    a.mov(rbx, p(param::SEED))?;
    a.xor(rbx, v(vcpu_block::INDEX))?;
    a.jnz(seeded)?;
    a.mov(rbx, FALLBACK_SEED)?;
    a.set_label(&mut seeded)?;

    let mut loops = [
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    ];
    for (code, target) in loops.iter().enumerate().skip(1) {
        a.cmp(rdi, code as i32)?;
        a.je(*target)?;
    }
    // Code 0 and anything unknown: idle.
    let [idle, dirty_all, seq, random, hotcold] = &mut loops;
    sweep_loop(a, l, idle, r11, false)?;
    sweep_loop(a, l, dirty_all, r11, true)?;
    sweep_loop(a, l, seq, r10, true)?;
    random_loop(a, l, random, false)?;
    random_loop(a, l, hotcold, true)
}

/// Boot, with r15 set: if the parameter block has a timer period and CPUID reports x2APIC,
/// load the GDT and IDT, switch the local APIC to x2APIC mode, enable it, start its
/// periodic timer and set `F_SLEEP`. Interrupts stay masked. Clobbers rax, rbx, rcx, rdx,
/// and preserves rdi.
fn timer_setup(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut spin = a.create_label();
    a.mov(f(F_SLEEP), 0)?;
    a.cmp(p(param::TIMER_COUNT), 0)?;
    a.je(spin)?;
    a.mov(eax, 1)?;
    a.cpuid()?;
    a.bt(ecx, CPUID_X2APIC_BIT)?;
    a.jnc(spin)?;
    a.lgdt(qword_ptr(GDTR_GPA))?;
    a.lidt(qword_ptr(IDTR_GPA))?;
    a.mov(ecx, MSR_APIC_BASE)?;
    a.rdmsr()?;
    a.or(eax, APIC_BASE_ENABLE_X2APIC)?;
    a.wrmsr()?;
    a.xor(edx, edx)?;
    for (msr, value) in [
        (MSR_X2APIC_SVR, SVR_APIC_ENABLE | i32::from(SPURIOUS_VECTOR)),
        (MSR_X2APIC_DIV_CONF, DIV_BY_1),
        (
            MSR_X2APIC_LVT_TIMER,
            LVT_TIMER_PERIODIC | i32::from(TIMER_VECTOR),
        ),
    ] {
        a.mov(ecx, msr)?;
        a.mov(eax, value)?;
        a.wrmsr()?;
    }
    // The initial count (below 2^32) starts the timer.
    a.mov(ecx, MSR_X2APIC_INIT_COUNT)?;
    a.mov(eax, dword_ptr(PARAM_GPA + param::TIMER_COUNT))?;
    a.wrmsr()?;
    a.mov(f(F_SLEEP), 1)?;
    a.set_label(&mut spin)
}

/// The interrupt handlers. The timer's counts the wake-up in the vCPU's block (r15: timer
/// interrupts are only taken inside `pace`) and acknowledges it; the spurious vector needs
/// no acknowledgement.
fn isrs(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.timer_isr)?;
    for r in [rax, rcx, rdx] {
        a.push(r)?;
    }
    a.inc(v(vcpu_block::WAKES))?;
    a.mov(ecx, MSR_X2APIC_EOI)?;
    a.xor(eax, eax)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    for r in [rdx, rcx, rax] {
        a.pop(r)?;
    }
    a.iretq()?;
    a.set_label(&mut l.spurious_isr)?;
    a.iretq()
}

/// The start of every step: read the clock every r8 steps.
fn step_pace(a: &mut CodeAssembler, l: &Labels) -> Result<(), IcedError> {
    let mut go = a.create_label();
    a.dec(r8)?;
    a.jnz(go)?;
    a.call(l.pace)?;
    a.set_label(&mut go)
}

/// Check (and write) of the page at rcx with ledger entry rdx. Clobbers rax, rdi.
fn step_check(a: &mut CodeAssembler, l: &Labels, write: bool) -> Result<(), IcedError> {
    let mut slow = a.create_label();
    let mut checked = a.create_label();
    // Fast path: a page written before, h0 == gpa ^ SIG and h1 == c.
    a.mov(eax, dword_ptr(rdx))?;
    a.mov(rdi, qword_ptr(rcx))?;
    a.xor(rdi, rcx)?;
    a.cmp(rdi, r9)?;
    a.jne(slow)?;
    a.cmp(qword_ptr(rcx + 8), rax)?;
    a.je(checked)?;
    // Never written, or invalid: the subroutine decides (and writes h0 for a write).
    a.set_label(&mut slow)?;
    a.call(if write { l.check_slow_w } else { l.check_slow })?;
    a.set_label(&mut checked)?;
    if write {
        // h0 already holds gpa ^ SIG.
        a.inc(eax)?; // c + 1 wraps at 2^32, and zero-extends into rax
        a.mov(qword_ptr(rcx + 8), rax)?;
        a.mov(dword_ptr(rdx), eax)?;
        a.inc(v(vcpu_block::WRITES))?;
    }
    a.inc(v(vcpu_block::CHECKS))
}

/// Pages `0..bound` of the share in order, forever; checks only, or checks and writes.
fn sweep_loop(
    a: &mut CodeAssembler,
    l: &Labels,
    start: &mut CodeLabel,
    bound: AsmRegister64,
    write: bool,
) -> Result<(), IcedError> {
    let mut step = a.create_label();
    let mut rewind = a.create_label();
    a.set_label(start)?;
    a.lea(rsi, r13 + bound * 4)?;
    a.set_label(&mut rewind)?;
    a.mov(rcx, r12)?;
    a.mov(rdx, r13)?;
    a.set_label(&mut step)?;
    step_pace(a, l)?;
    step_check(a, l, write)?;
    a.add(rcx, 4096)?;
    a.add(rdx, 4)?;
    a.cmp(rdx, rsi)?;
    a.jb(step)?;
    a.jmp(rewind)
}

/// `random`: a page of the working set; `hotcold`: with the low 4 bits of the state zero a
/// page of the whole share, else one of the hot set. The page index is the high half of
/// `state * n`.
fn random_loop(
    a: &mut CodeAssembler,
    l: &Labels,
    start: &mut CodeLabel,
    hotcold: bool,
) -> Result<(), IcedError> {
    a.set_label(start)?;
    step_pace(a, l)?;
    // xorshift64 on rbx.
    for (shift, left) in [(13, true), (7, false), (17, true)] {
        a.mov(rax, rbx)?;
        if left {
            a.shl(rax, shift)?;
        } else {
            a.shr(rax, shift)?;
        }
        a.xor(rbx, rax)?;
    }
    a.mov(rax, rbx)?;
    if hotcold {
        let mut hot = a.create_label();
        let mut picked = a.create_label();
        a.test(al, 15)?;
        a.jnz(hot)?;
        a.mul(r11)?;
        a.jmp(picked)?;
        a.set_label(&mut hot)?;
        a.mul(r14)?;
        a.set_label(&mut picked)?;
    } else {
        a.mul(r10)?;
    }
    a.mov(rcx, rdx)?;
    a.shl(rcx, 12)?;
    a.add(rcx, r12)?;
    a.lea(rdx, r13 + rdx * 4)?;
    step_check(a, l, true)?;
    a.jmp(*start)
}

/// rax = rdx:rax = TSC.
fn rdtsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// `pace`: prints a report if one is due, waits for the step deadline if rate limited, and
/// reloads r8. Waits in `hlt` (woken by the timer) when `F_SLEEP` is set, else spins with
/// `PAUSE`; after each wait it starts over, so reports stay on time during long waits.
/// Preserves every other register.
fn pace(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut due = a.create_label();
    let mut store = a.create_label();
    let mut rate = a.create_label();
    let mut reset = a.create_label();
    let mut spin = a.create_label();
    let mut go = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l.pace)?;
    for r in [rax, rcx, rdx, rsi, rdi] {
        a.push(r)?;
    }
    a.set_label(&mut top)?;
    rdtsc(a)?;
    a.mov(rsi, rax)?; // rsi = now
    a.cmp(rsi, f(F_NEXT_REPORT))?;
    a.jae(due)?;
    // Not due. If the next report is more than two intervals away the TSC went back (a
    // restore on another host): report one interval from now.
    a.mov(rcx, f(F_NEXT_REPORT))?;
    a.sub(rcx, rsi)?;
    a.mov(rdx, p(param::REPORT_TICKS))?;
    a.add(rdx, rdx)?;
    a.cmp(rcx, rdx)?;
    a.jbe(rate)?;
    a.mov(rax, rsi)?;
    a.add(rax, p(param::REPORT_TICKS))?;
    a.jmp(store)?;
    // Due: print, and schedule the next one; if that is still behind (the VM was paused),
    // schedule from now rather than printing a burst.
    a.set_label(&mut due)?;
    a.call(l.report)?;
    a.mov(rax, f(F_NEXT_REPORT))?;
    a.add(rax, p(param::REPORT_TICKS))?;
    a.cmp(rax, rsi)?;
    a.ja(store)?;
    a.mov(rax, rsi)?;
    a.add(rax, p(param::REPORT_TICKS))?;
    a.set_label(&mut store)?;
    a.mov(f(F_NEXT_REPORT), rax)?;
    // Pacing: restart from now when the deadline is more than an interval behind, or more
    // than an interval plus a step ahead (paused, or the TSC jumped), then wait for it.
    a.set_label(&mut rate)?;
    a.mov(rcx, f(F_TICKS))?;
    a.test(rcx, rcx)?;
    a.jz(done)?;
    a.mov(rax, rsi)?;
    a.sub(rax, f(F_DEADLINE))?; // now - deadline
    a.mov(rdx, p(param::REPORT_TICKS))?;
    a.cmp(rax, rdx)?;
    a.jg(reset)?;
    a.add(rdx, rcx)?;
    a.neg(rdx)?;
    a.cmp(rax, rdx)?;
    a.jge(spin)?;
    a.set_label(&mut reset)?;
    a.mov(f(F_DEADLINE), rsi)?;
    a.set_label(&mut spin)?;
    a.cmp(rsi, f(F_DEADLINE))?;
    a.jae(go)?;
    let mut pause = a.create_label();
    a.cmp(f(F_SLEEP), 0)?;
    a.je(pause)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.jmp(top)?;
    a.set_label(&mut pause)?;
    a.pause()?;
    a.jmp(top)?;
    a.set_label(&mut go)?;
    a.add(f(F_DEADLINE), rcx)?;
    a.set_label(&mut done)?;
    a.mov(r8, f(F_EVERY))?;
    for r in [rdi, rsi, rdx, rcx, rax] {
        a.pop(r)?;
    }
    a.ret()
}

/// `check_slow` (`check_slow_w`): the full check of the page at rcx, ledger entry rdx,
/// ledger value rax, for pages the fast path did not accept. A page never written
/// (all zero) is valid; anything else counts a failure and prints
/// "FAIL vcpu N page P\n" (P the guest frame number). `check_slow_w` then writes
/// `h0 = gpa ^ SIG` for the caller's write. Preserves every register but rdi.
fn check_slow(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    let mut not_sig = a.create_label();
    let mut bad = a.create_label();
    let mut ok = a.create_label();
    a.set_label(&mut l.check_slow_w)?;
    a.call(l.check_slow)?;
    a.mov(rdi, rcx)?;
    a.xor(rdi, r9)?;
    a.mov(qword_ptr(rcx), rdi)?;
    a.ret()?;

    a.set_label(&mut l.check_slow)?;
    a.mov(rdi, qword_ptr(rcx))?;
    a.xor(rdi, rcx)?;
    a.cmp(rdi, r9)?;
    a.jne(not_sig)?;
    a.cmp(qword_ptr(rcx + 8), rax)?;
    a.je(ok)?;
    a.jmp(bad)?;
    a.set_label(&mut not_sig)?;
    a.test(eax, eax)?;
    a.jnz(bad)?;
    a.cmp(qword_ptr(rcx), 0)?;
    a.jne(bad)?;
    a.cmp(qword_ptr(rcx + 8), 0)?;
    a.je(ok)?;
    a.set_label(&mut bad)?;
    a.inc(v(vcpu_block::FAILS))?;
    for r in [rax, rcx, rdx] {
        a.push(r)?;
    }
    a.lea(rdi, ptr(l.s_fail))?;
    a.call(l.puts)?;
    a.mov(rax, v(vcpu_block::INDEX))?;
    a.call(l.putdec)?;
    a.lea(rdi, ptr(l.s_page))?;
    a.call(l.puts)?;
    a.mov(rax, qword_ptr(rsp + 8))?; // the saved rcx
    a.shr(rax, 12)?;
    a.call(l.putdec)?;
    newline(a)?;
    for r in [rdx, rcx, rax] {
        a.pop(r)?;
    }
    a.set_label(&mut ok)?;
    a.ret()
}

/// `report`: prints "vcpu N: writes W checks C fails F\n". Clobbers rax, rcx, rdx, rdi.
fn report(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    a.set_label(&mut l.report)?;
    for (s, field) in [
        (l.s_vcpu, vcpu_block::INDEX),
        (l.s_writes, vcpu_block::WRITES),
        (l.s_checks, vcpu_block::CHECKS),
        (l.s_fails, vcpu_block::FAILS),
    ] {
        a.lea(rdi, ptr(s))?;
        a.call(l.puts)?;
        a.mov(rax, v(field))?;
        a.call(l.putdec)?;
    }
    newline(a)?;
    a.inc(v(vcpu_block::REPORTS))?;
    a.ret()
}

/// Prints '\n'. Clobbers rax, rdx.
fn newline(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(al, b'\n' as i32)?;
    a.mov(edx, COM1)?;
    a.out(dx, al)
}

/// `puts`: prints the NUL-terminated string at rdi. Clobbers rax, rdx, rdi.
fn puts(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l.puts)?;
    a.mov(edx, COM1)?;
    a.set_label(&mut top)?;
    a.mov(al, byte_ptr(rdi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.inc(rdi)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// `putdec`: prints rax in decimal. Clobbers rax, rcx, rdx, rdi.
fn putdec(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    let mut digit = a.create_label();
    let mut out = a.create_label();
    a.set_label(&mut l.putdec)?;
    a.sub(rsp, 32)?;
    a.lea(rdi, rsp + 32)?; // digits go backwards from the end of the buffer
    a.mov(ecx, 10)?;
    a.set_label(&mut digit)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.add(dl, b'0' as i32)?;
    a.dec(rdi)?;
    a.mov(byte_ptr(rdi), dl)?;
    a.test(rax, rax)?;
    a.jnz(digit)?;
    a.lea(rcx, rsp + 32)?;
    a.mov(edx, COM1)?;
    a.set_label(&mut out)?;
    a.mov(al, byte_ptr(rdi))?;
    a.out(dx, al)?;
    a.inc(rdi)?;
    a.cmp(rdi, rcx)?;
    a.jb(out)?;
    a.add(rsp, 32)?;
    a.ret()
}

fn strings(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), IcedError> {
    for (label, s) in [
        (&mut l.s_vcpu, &b"vcpu \0"[..]),
        (&mut l.s_writes, b": writes \0"),
        (&mut l.s_checks, b" checks \0"),
        (&mut l.s_fails, b" fails \0"),
        (&mut l.s_fail, b"FAIL vcpu \0"),
        (&mut l.s_page, b" page \0"),
    ] {
        a.set_label(label)?;
        a.db(s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_and_addresses_params_absolutely() {
        let prog = program().unwrap();
        let code = &prog.code;
        assert!(
            code.len() > 100 && code.len() < 4096,
            "{} bytes",
            code.len()
        );
        // mov rcx, [0x2030] (the rate) must be absolute (SIB, no base), not RIP-relative.
        let abs = [0x48, 0x8b, 0x0c, 0x25, 0x30, 0x20, 0x00, 0x00];
        assert!(
            code.windows(abs.len()).any(|w| w == abs),
            "no absolute load of the rate"
        );
        // The handlers lie in the code; the spurious one is a lone iretq (48 cf).
        let end = CODE_GPA + code.len() as u64;
        assert!((CODE_GPA..end).contains(&prog.timer_isr));
        let off = (prog.spurious_isr - CODE_GPA) as usize;
        assert_eq!(code[off..off + 2], [0x48, 0xcf]);
    }
}
