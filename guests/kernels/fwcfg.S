/* fwcfg: read QEMU's fw_cfg through its ports: signature, NB_CPUS, MAX_CPUS, RAM size,
 * the kernel command line keys, then find etc/e820 in the file directory and print it. */
    .include "kernel.inc"
    MULTIBOOT_HEADER
    KERNEL_ENTRY
    xor     %eax, %eax                  /* FW_CFG_SIGNATURE */
    call    fw_cfg_select
    call    fw_cfg_read32
    cmp     $0x554d4551, %eax           /* "QEMU" */
    jne     fail
    mov     $msg_signature, %esi
    call    puts32
    mov     $0x05, %eax                 /* FW_CFG_NB_CPUS */
    call    fw_cfg_select
    call    fw_cfg_read32
    mov     $msg_cpus, %esi
    call    puts32
    call    putdec32
    mov     $0x0f, %eax                 /* FW_CFG_MAX_CPUS */
    call    fw_cfg_select
    call    fw_cfg_read32
    mov     $msg_max_cpus, %esi
    call    puts32
    call    putdec32
    mov     $0x03, %eax                 /* FW_CFG_RAM_SIZE (u64) */
    call    fw_cfg_select
    call    fw_cfg_read32
    mov     %eax, %ebx
    call    fw_cfg_read32
    shrd    $20, %eax, %ebx
    mov     %ebx, %eax
    mov     $msg_ram, %esi
    call    puts32
    call    putdec32
    mov     $msg_mib, %esi
    call    puts32
    mov     $0x14, %eax                 /* FW_CFG_CMDLINE_SIZE */
    call    fw_cfg_select
    call    fw_cfg_read32
    mov     %eax, %ecx
    mov     $msg_cmdline, %esi
    call    puts32
    mov     $0x15, %eax                 /* FW_CFG_CMDLINE_DATA */
    call    fw_cfg_select
    mov     $FW_CFG_DATA, %dx
1:  in      %dx, %al
    test    %al, %al
    jz      2f
    call    putc32
    loop    1b
2:  mov     $'\n', %al
    call    putc32
    /* the file directory: u32 count (BE), then {u32 size BE, u16 select BE, u16, char name[56]} */
    mov     $0x19, %eax
    call    fw_cfg_select
    call    fw_cfg_read32be
    mov     %eax, %ebp                  /* files left */
next_file:
    test    %ebp, %ebp
    jz      no_e820
    dec     %ebp
    call    fw_cfg_read32be
    mov     %eax, %ebx                  /* size */
    call    fw_cfg_read32be
    shr     $16, %eax
    mov     %eax, %esi                  /* select */
    mov     $name_buffer, %edi
    mov     $56, %ecx
    mov     $FW_CFG_DATA, %dx
3:  in      %dx, %al
    stosb
    loop    3b
    push    %esi
    mov     $name_buffer, %esi
    mov     $name_e820, %edi
    mov     $9, %ecx
    repe cmpsb
    pop     %esi
    jne     next_file
    /* found: %ebx bytes of 20-byte entries {u64 address, u64 length, u32 type} under key %esi */
    mov     %esi, %eax
    call    fw_cfg_select
    mov     %ebx, %eax
    xor     %edx, %edx
    mov     $20, %ecx
    div     %ecx
    mov     %eax, %ebp                  /* entries */
    mov     $msg_e820_count, %esi
    call    puts32
    call    putdec32
    mov     $msg_entries, %esi
    call    puts32
4:  test    %ebp, %ebp
    jz      done
    dec     %ebp
    mov     $msg_e820, %esi
    call    puts32
    call    fw_cfg_read32
    mov     %eax, %ebx
    call    fw_cfg_read32
    call    hex8_32
    mov     %ebx, %eax
    call    hex8_32
    mov     $msg_length, %esi
    call    puts32
    call    fw_cfg_read32
    mov     %eax, %ebx
    call    fw_cfg_read32
    call    hex8_32
    mov     %ebx, %eax
    call    hex8_32
    mov     $msg_type, %esi
    call    puts32
    call    fw_cfg_read32
    call    putdec32
    mov     $'\n', %al
    call    putc32
    jmp     4b
done:
    xor     %eax, %eax
    jmp     exit32
no_e820:
    mov     $msg_no_e820, %esi
    call    puts32
fail:
    mov     $1, %eax
    jmp     exit32
    STRING  msg_signature, "fw_cfg: signature QEMU\n"
    STRING  msg_cpus, "fw_cfg: NB_CPUS "
    STRING  msg_max_cpus, ", MAX_CPUS "
    STRING  msg_ram, ", RAM "
    STRING  msg_mib, " MiB\n"
    STRING  msg_cmdline, "fw_cfg: command line: "
    STRING  msg_e820_count, "fw_cfg: etc/e820 has "
    STRING  msg_entries, " entries\n"
    STRING  msg_e820, "e820: 0x"
    STRING  msg_length, " length 0x"
    STRING  msg_type, " type "
    STRING  msg_no_e820, "fw_cfg: no etc/e820 in the file directory\n"
    STRING  name_e820, "etc/e820"
    .bss
name_buffer: .skip 56
