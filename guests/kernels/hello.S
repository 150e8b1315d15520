/* hello: print one line on COM1 and exit with code 0 (status 1). The smallest test kernel. */
    .include "kernel.inc"
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    mov     $hello, %esi
    call    puts32
    xor     %eax, %eax
    jmp     exit32
    STRING  hello, "Hello from a Multiboot kernel on pykvm\n"
