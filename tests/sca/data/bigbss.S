/*
 * bigbss: a test-only UDP service (port 9997) with a large static buffer (BIG bytes of .bss,
 * set by build.sh). Each datagram makes it write one byte into every page of the buffer, with
 * no syscall in between, then answer "B". A service that clears a big static buffer per
 * request does the same. Test-only; run only inside herdwall's emulator.
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
loop:
    mov $45, %eax               /* recvfrom(fd, pkt, 64, 0, NULL, NULL) */
    mov %rbx, %rdi
    lea pkt(%rip), %rsi
    mov $64, %edx
    xor %r10d, %r10d
    xor %r8d, %r8d
    xor %r9d, %r9d
    syscall
    lea big(%rip), %rdi
    lea BIG(%rdi), %rcx
1:
    movb $1, (%rdi)
    add $4096, %rdi
    cmp %rcx, %rdi
    jb 1b
    mov $44, %eax               /* sendto(fd, "B", 1, 0, NULL, 0) */
    mov %rbx, %rdi
    lea reply(%rip), %rsi
    mov $1, %edx
    xor %r10d, %r10d
    xor %r8d, %r8d
    xor %r9d, %r9d
    syscall
    jmp loop

    .data
reply:
    .byte 'B'
    .bss
pkt:
    .zero 64
    .balign 4096
big:
    .zero BIG
