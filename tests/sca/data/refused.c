/*
 * refused: a trivial program the ELF loader must refuse in the builds build.sh makes of it
 * (dynamically linked, position-independent, 32-bit). With EXIT_AT_BOOT it is also built as a
 * static image that exits before its first receive, which a sandbox must refuse to boot.
 * Test-only; never run natively.
 */
#ifdef WITH_LIBC
int main(void)
{
    return 3;
}
#else
__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "    mov $3, %edi\n"
        "    mov $60, %eax\n"
        "    syscall\n"
        "    hlt\n");
#endif
