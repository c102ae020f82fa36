/* The CPL0 part of the guest beyond boot.S: per-CPU tables and FPU/SSE/AVX enablement.
 * Compiled with -mgeneral-regs-only so nothing here touches the vector registers that the
 * CPL3 self-check watches. Runs once per CPU; keep it short (CPL0 is emulated here). */
#include "guest.h"
#include "probe.h"

struct idt_gate {
  uint16_t offset_low, selector;
  uint8_t ist, type;
  uint16_t offset_mid;
  uint32_t offset_high, reserved;
} __attribute__((packed));

struct tss64 {
  uint32_t reserved0;
  uint64_t rsp0, rsp1, rsp2, reserved1;
  uint64_t ist[7];
  uint64_t reserved2;
  uint16_t reserved3, iomap_base;
  uint8_t iomap[8192 + 1]; /* all ports permitted; the trailing byte must be 0xff */
} __attribute__((packed));

extern uint64_t gdt_tss[];
extern void *exception_stubs[22];
extern void timer_isr(void), spurious_isr(void), ud_isr(void);

static struct idt_gate idt[256];
static struct tss64 tss[MAX_CPUS];
static struct {
  uint16_t limit;
  uint64_t base;
} __attribute__((packed)) idt_desc = {sizeof(idt) - 1, (uint64_t)idt};

static void set_gate(unsigned vector, void *handler) {
  uint64_t addr = (uint64_t)handler;
  idt[vector] = (struct idt_gate){(uint16_t)addr, 0x10, 0, 0x8e, (uint16_t)(addr >> 16), (uint32_t)(addr >> 32), 0};
}


static void enable_vector_state(void) {
  uint64_t cr0, cr4;
  __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
  cr0 = (cr0 & ~(1ul << 2)) | (1ul << 1) | (1ul << 5); /* clear EM, set MP and NE */
  __asm__ volatile("mov %0, %%cr0" ::"r"(cr0));
  __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
  cr4 |= (1ul << 9) | (1ul << 10); /* OSFXSR, OSXMMEXCPT */
  uint32_t a, b, c, d;
  cpuid(1, &a, &b, &c, &d);
  int xsave = (c >> 26) & 1, avx = (c >> 28) & 1;
  if (xsave) cr4 |= 1ul << 18; /* OSXSAVE */
  __asm__ volatile("mov %0, %%cr4" ::"r"(cr4));
  if (xsave) {
    uint32_t xcr0 = 3u | (avx ? 4u : 0u); /* x87, SSE, and AVX where present */
    __asm__ volatile("xsetbv" ::"c"(0), "a"(xcr0), "d"(0));
  }
}

void cpu_init(unsigned cpu) {
  if (cpu == 0) {
    for (unsigned v = 0; v < 22; v++) set_gate(v, exception_stubs[v]);
    set_gate(TIMER_VECTOR, timer_isr);
    set_gate(SPURIOUS_VECTOR, spurious_isr);
    set_gate(6, ud_isr); /* also the halt request, see boot.S */
  }
  __asm__ volatile("lidt %0" ::"m"(idt_desc));

  struct tss64 *t = &tss[cpu];
  t->rsp0 = (uint64_t)kstacks[cpu] + KSTACK_SIZE;
  t->iomap_base = 104;
  t->iomap[8192] = 0xff;
  uint64_t base = (uint64_t)t, limit = sizeof(struct tss64) - 1;
  gdt_tss[cpu * 2] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ul << 40) | (((base >> 24) & 0xff) << 56);
  gdt_tss[cpu * 2 + 1] = base >> 32;
  __asm__ volatile("ltr %w0" ::"r"(0x30 + cpu * 16));

  enable_vector_state();
  percpu_of(cpu)->cpu = cpu;
  lapic_write(0xf0, 0x100 | SPURIOUS_VECTOR); /* software-enable the LAPIC */
}

static void serial_put(const char *s) {
  while (*s) outb(0x3f8, (uint8_t)*s++);
}

void exception_report(unsigned vector, const uint64_t *frame) {
  static const char hex[] = "0123456789abcdef";
  char line[] = "mig-guest: exception 0x.. at rip 0x................ rflags 0x................\n";
  line[23] = hex[(vector >> 4) & 0xf];
  line[24] = hex[vector & 0xf];
  for (int i = 0; i < 16; i++) {
    line[35 + i] = hex[(frame[1] >> (60 - 4 * i)) & 0xf]; /* rip */
    line[61 + i] = hex[(frame[3] >> (60 - 4 * i)) & 0xf]; /* rflags */
  }
  serial_put(line);
  outl(MIG_PROBE_CHECK_FAIL, MIG_CHECK_FAIL_EXCEPTION | (vector << 8));
}
