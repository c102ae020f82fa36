/* Multiboot v1 entry, the switch to long mode, the AP trampoline and the interrupt stubs.
 * Everything here runs at CPL0, which this project's hosts emulate at about 1M instructions
 * per second: keep it short and leave loops to CPL3. */
#include "guest.h"

#define KCODE32 0x08
#define KCODE64 0x10
#define KDATA 0x18
#define UDATA 0x20
#define UCODE64 0x28
#define TSS0 0x30
#define AP_TRAMPOLINE 0x8000

  .section .multiboot, "a"
  .balign 4
  .long 0x1badb002
  .long 0x00000003 /* page-align modules, want memory information */
  .long -(0x1badb002 + 0x00000003)

  .section .text32, "ax"
  .code32
  .globl _start
_start:
  cli
  movl %ebx, mb_info_ptr
  /* Mask both 8259 PICs: a BIOS (QEMU's SeaBIOS) leaves the PIT ticking on IRQ0 with the PIC
   * based at vector 8, which would arrive as a double fault once interrupts are on. */
  movb $0xff, %al
  outb %al, $0xa1
  outb %al, $0x21
  xorl %edi, %edi /* cpu 0 */
  jmp enter_long_mode

/* Shared by the BSP and the APs: EDI holds the CPU index, ESP is unusable until long mode. */
enter_long_mode:
  lgdt gdt_desc
  movl %cr4, %eax
  orl $(1 << 5), %eax /* PAE */
  movl %eax, %cr4
  movl $pml4, %eax
  movl %eax, %cr3
  movl $0xc0000080, %ecx /* EFER */
  rdmsr
  orl $(1 << 8), %eax /* LME */
  wrmsr
  movl %cr0, %eax
  orl $0x80000001, %eax /* PG | PE */
  movl %eax, %cr0
  ljmp $KCODE64, $long_mode

  .code64
long_mode:
  movw $KDATA, %ax
  movw %ax, %ds
  movw %ax, %es
  movw %ax, %ss
  xorw %ax, %ax
  movw %ax, %fs
  movw %ax, %gs
  /* rsp = top of this CPU's kernel stack */
  movl %edi, %eax
  incl %eax
  shll $14, %eax /* * KSTACK_SIZE */
  leaq kstacks(%rip), %rsp
  addq %rax, %rsp
  movl %edi, %r15d
  call cpu_init /* edi = cpu */
  /* Drop to CPL3 with IOPL=3 and interrupts on: iretq to user_main(cpu) on the user stack. */
  movl %r15d, %edi
  movl %edi, %eax
  incl %eax
  shlq $16, %rax /* * USTACK_SIZE */
  leaq ustacks(%rip), %rcx
  addq %rcx, %rax
  pushq $(UDATA | 3)
  pushq %rax
  /* IOPL=3 grants port I/O where the host honours it; hosts that run guest user mode in
   * their own ring 3 (PVM, like Xen PV) mask IOPL, so the TSS also carries an all-permit
   * I/O bitmap (kernel.c). */
  pushq $0x3202 /* IF | IOPL=3 | reserved bit 1 */
  pushq $(UCODE64 | 3)
  leaq user_main(%rip), %rax
  pushq %rax
  iretq

/* APs arrive here from the trampoline in 32-bit protected mode. */
  .code32
ap_protected:
  movw $KDATA, %ax
  movw %ax, %ds
  movw %ax, %es
  movw %ax, %ss
  movl $1, %edi
  lock xaddl %edi, cpus_started /* edi = this AP's index */
  cmpl $MAX_CPUS, %edi
  jae ap_park
  jmp enter_long_mode
ap_park:
  cli
  hlt
  jmp ap_park

/* Real-mode code copied to AP_TRAMPOLINE by the BSP; the SIPI vector is AP_TRAMPOLINE >> 12.
 * It only switches to protected mode and jumps to ap_protected at its linked address. */
  .code16
  .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
  cli
  xorw %ax, %ax
  movw %ax, %ds
  lgdtl AP_TRAMPOLINE + (ap_gdt_desc - ap_trampoline)
  movl %cr0, %eax
  orl $1, %eax
  movl %eax, %cr0
  ljmpl $KCODE32, $ap_protected
  .balign 8
ap_gdt_desc:
  .word gdt_end - gdt - 1
  .long gdt
ap_trampoline_end:

  .code64
  .text
/* LAPIC timer: count the tick in this CPU's percpu, acknowledge, return. */
  .globl timer_isr
timer_isr:
  pushq %rax
  movq %rsp, %rax
  andq $~(KSTACK_SIZE - 1), %rax
  incq (%rax)
  movl $LAPIC_BASE + 0xb0, %eax /* EOI */
  movl $0, (%rax)
  popq %rax
  iretq

  .globl spurious_isr
spurious_isr:
  iretq

/* #UD: the designated ud2 in guest_halt() asks to halt; anything else is a real fault.
 * CPL3 reaches CPL0 through an exception because PVM hosts refuse int N from user mode (#UD
 * anyway) and run a syscall entry natively at ring 3, where sti faults. sti's one-instruction
 * shadow makes sti+hlt atomic: an interrupt already pending wakes the hlt, never is missed. */
  .globl ud_isr
ud_isr:
  pushq %rax
  leaq guest_halt_ud2(%rip), %rax
  cmpq %rax, 8(%rsp) /* faulting rip */
  jne 1f
  addq $2, 8(%rsp) /* resume after the ud2 */
  popq %rax
  sti
  hlt
  iretq
1:
  popq %rax
  jmp exc6

/* CPL3: halt this vCPU until its next interrupt. */
  .globl guest_halt
guest_halt:
  .globl guest_halt_ud2
guest_halt_ud2:
  ud2
  ret

/* Exceptions: report vector and faulting RIP, then stop this CPU. */
.macro EXC vector, has_error
  .globl exc\vector
exc\vector:
  .if \has_error == 0
  pushq $0
  .endif
  movl $\vector, %edi
  movq %rsp, %rsi /* -> error code, rip, cs, rflags, rsp, ss */
  call exception_report
1:
  cli
  hlt
  jmp 1b
.endm
  EXC 0, 0
  EXC 1, 0
  EXC 2, 0
  EXC 3, 0
  EXC 4, 0
  EXC 5, 0
  EXC 6, 0
  EXC 7, 0
  EXC 8, 1
  EXC 9, 0
  EXC 10, 1
  EXC 11, 1
  EXC 12, 1
  EXC 13, 1
  EXC 14, 1
  EXC 15, 0
  EXC 16, 0
  EXC 17, 1
  EXC 18, 0
  EXC 19, 0
  EXC 20, 0
  EXC 21, 1

  .section .rodata
  .globl exception_stubs
  .balign 8
exception_stubs:
  .quad exc0, exc1, exc2, exc3, exc4, exc5, exc6, exc7, exc8, exc9, exc10
  .quad exc11, exc12, exc13, exc14, exc15, exc16, exc17, exc18, exc19, exc20, exc21

  .data
  .balign 16
  .globl gdt, gdt_tss
gdt:
  .quad 0
  .quad 0x00cf9a000000ffff /* KCODE32 */
  .quad 0x00af9a000000ffff /* KCODE64 */
  .quad 0x00cf92000000ffff /* KDATA */
  .quad 0x00cff2000000ffff /* UDATA, DPL3 */
  .quad 0x00affa000000ffff /* UCODE64, DPL3 */
gdt_tss:
  .fill MAX_CPUS * 2, 8, 0 /* one 16-byte TSS descriptor per CPU, filled by cpu_init */
gdt_end:
gdt_desc:
  .word gdt_end - gdt - 1
  .quad gdt

  .globl mb_info_ptr, cpus_started
mb_info_ptr: .long 0
cpus_started: .long 1 /* the BSP */

/* Identity map of the first 4 GiB with 2 MiB pages, user-accessible, built by the assembler
 * so that CPL0 spends no instructions on it. Memory above 4 GiB is mapped at CPL3 (workload.c)
 * into high_pds, since only the guest knows how much there is. */
  .balign 4096
pml4:
  .quad pdpt + 0x7
  .fill 511, 8, 0
  .globl pdpt
pdpt:
  .quad pd + 0x7, pd + 0x1007, pd + 0x2007, pd + 0x3007
  .fill 508, 8, 0
pd:
  .set page, 0
  .rept 2048
  .quad (page << 21) | 0x87 /* present, writable, user, 2 MiB */
  .set page, page + 1
  .endr

  .bss
  .balign 4096
  .globl high_pds
high_pds:
  .skip HIGH_PD_PAGES * 4096
  .balign KSTACK_SIZE
  .globl kstacks, ustacks
kstacks:
  .skip MAX_CPUS * KSTACK_SIZE
  .balign 4096
ustacks:
  .skip MAX_CPUS * USTACK_SIZE
