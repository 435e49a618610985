/*
 * snippet: a test-only UDP service (port 9998) whose only work is a straight-line run of data
 * movement over the received datagram, so a test can compare the taint engine's byte labels
 * with Triton's symbolic view of the same instructions. Between snippet_begin and snippet_end
 * there is no call and no syscall; results stay in rbx, rbp, r12-r15 and in `out`.
 * Test-only; run only inside herdwall's emulator.
 */
    .text
    .globl _start
_start:
    mov $41, %eax               /* socket(AF_INET, SOCK_DGRAM, 0) */
    mov $2, %edi
    mov $2, %esi
    xor %edx, %edx
    syscall
    mov %rax, %rbx
    mov $49, %eax               /* bind(fd, &addr, 16) */
    mov %rbx, %rdi
    lea addr(%rip), %rsi
    mov $16, %edx
    syscall
    mov %rbx, sockfd(%rip)
loop:
    mov $45, %eax               /* recvfrom(fd, buf, 64, 0, NULL, NULL) */
    mov sockfd(%rip), %rdi
    lea buf(%rip), %rsi
    mov $64, %edx
    xor %r10d, %r10d
    xor %r8d, %r8d
    xor %r9d, %r9d
    syscall
    .globl snippet_begin
snippet_begin:
    lea buf(%rip), %rsi
    mov (%rsi), %rbx            /* m0..m7 */
    ror $8, %rbx                /* m1..m7, m0 */
    movzbl 8(%rsi), %r12d       /* m8, then zeros */
    movsbq 9(%rsi), %r13        /* m9, then its sign */
    mov 10(%rsi), %r14d         /* m10..m13, upper half cleared */
    bswap %r14d                 /* m13..m10 */
    mov 16(%rsi), %r15
    shr $16, %r15               /* m18..m23, then zeros */
    movw 24(%rsi), %ax
    shl $8, %eax                /* 0, m24, m25, ... */
    push %rax
    pop %rbp
    xchg %r12, %r13
    movq $0x1122334455667788, %rcx
    add %rcx, %r12              /* a sum: every byte may depend on its own and lower bytes */
    movdqu 32(%rsi), %xmm0
    movdqu %xmm0, out(%rip)     /* m32..m47 */
    mov %r15d, out+16(%rip)     /* m18..m21 */
    movb $0x5a, out+17(%rip)    /* a constant over one of them */
    mov 48(%rsi), %edx
    mov %dx, out+20(%rip)       /* m48, m49 */
    cmpb $0x41, 50(%rsi)        /* a branch on m50 */
    je 1f
    nop
1:
    .globl snippet_end
snippet_end:
    jmp loop

    .data
addr:
    .short 2
    .byte 0x27, 0x0e            /* port 9998 */
    .long 0
    .quad 0
sockfd:
    .quad 0
    .bss
    .globl buf, out
buf:
    .zero 64
out:
    .zero 32
