/* void regcheck_spin(const uint64_t *pattern, uint64_t *dump, uint64_t iterations, int avx)
 *
 * Loads rbx, rbp, r12-r15 and xmm8-15 (ymm8-15 with avx) from `pattern`, spins for
 * `iterations` without touching them, then stores them to `dump` in the same layout:
 * 6 GPRs, then 4 qwords per vector register (xmm uses the first 2). A pause, save, migration
 * and restore that lands inside the spin must leave every one of them unchanged. */
  .text
  .globl regcheck_spin
regcheck_spin:
  pushq %rbx
  pushq %rbp
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq 0(%rdi), %rbx
  movq 8(%rdi), %rbp
  movq 16(%rdi), %r12
  movq 24(%rdi), %r13
  movq 32(%rdi), %r14
  movq 40(%rdi), %r15
  testl %ecx, %ecx
  jnz 2f
  movdqu 48(%rdi), %xmm8
  movdqu 80(%rdi), %xmm9
  movdqu 112(%rdi), %xmm10
  movdqu 144(%rdi), %xmm11
  movdqu 176(%rdi), %xmm12
  movdqu 208(%rdi), %xmm13
  movdqu 240(%rdi), %xmm14
  movdqu 272(%rdi), %xmm15
  jmp 3f
2:
  vmovdqu 48(%rdi), %ymm8
  vmovdqu 80(%rdi), %ymm9
  vmovdqu 112(%rdi), %ymm10
  vmovdqu 144(%rdi), %ymm11
  vmovdqu 176(%rdi), %ymm12
  vmovdqu 208(%rdi), %ymm13
  vmovdqu 240(%rdi), %ymm14
  vmovdqu 272(%rdi), %ymm15
3:
  movq %rdx, %rax
  xorl %r8d, %r8d
1:
  addq %rax, %r8
  rolq $7, %r8
  decq %rax
  jnz 1b
  movq %rbx, 0(%rsi)
  movq %rbp, 8(%rsi)
  movq %r12, 16(%rsi)
  movq %r13, 24(%rsi)
  movq %r14, 32(%rsi)
  movq %r15, 40(%rsi)
  testl %ecx, %ecx
  jnz 4f
  movdqu %xmm8, 48(%rsi)
  movdqu %xmm9, 80(%rsi)
  movdqu %xmm10, 112(%rsi)
  movdqu %xmm11, 144(%rsi)
  movdqu %xmm12, 176(%rsi)
  movdqu %xmm13, 208(%rsi)
  movdqu %xmm14, 240(%rsi)
  movdqu %xmm15, 272(%rsi)
  jmp 5f
4:
  vmovdqu %ymm8, 48(%rsi)
  vmovdqu %ymm9, 80(%rsi)
  vmovdqu %ymm10, 112(%rsi)
  vmovdqu %ymm11, 144(%rsi)
  vmovdqu %ymm12, 176(%rsi)
  vmovdqu %ymm13, 208(%rsi)
  vmovdqu %ymm14, 240(%rsi)
  vmovdqu %ymm15, 272(%rsi)
  vzeroupper
5:
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbp
  popq %rbx
  ret
  .section .note.GNU-stack, "", @progbits
