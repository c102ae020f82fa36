/* Shared between the guest's CPL0 and CPL3 code. */
#ifndef MIG_GUEST_H
#define MIG_GUEST_H

#define MAX_CPUS 16
#define KSTACK_SIZE 16384 /* per-CPU kernel stack; struct percpu sits at its lowest address */
#define USTACK_SIZE 65536
#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xff
#define LAPIC_BASE 0xfee00000
#define MAX_MEMORY_GIB 128 /* guest physical addresses the workload can map */
#define HIGH_PD_PAGES (MAX_MEMORY_GIB - 4) /* one page directory per GiB above 4 GiB */

#ifndef __ASSEMBLER__
#include <stdint.h>

/* Per-CPU data at the base of each kernel stack, so the timer handler finds it from %rsp
 * without a table lookup. All guest memory is user-accessible, so CPL3 reads it directly. */
struct percpu {
  volatile uint64_t ticks; /* LAPIC timer interrupts handled; offset 0 is used by boot.S */
  uint32_t cpu;
};

extern uint8_t kstacks[MAX_CPUS][KSTACK_SIZE];
extern uint8_t ustacks[MAX_CPUS][USTACK_SIZE];
extern uint32_t mb_info_ptr;
extern volatile uint32_t cpus_started;
extern char _end[];
extern uint64_t pdpt[512];
extern uint64_t high_pds[HIGH_PD_PAGES][512];

static inline struct percpu *percpu_of(unsigned cpu) { return (struct percpu *)kstacks[cpu]; }

static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint32_t inl(uint16_t port) {
  uint32_t v;
  __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}
static inline uint16_t inw(uint16_t port) {
  uint16_t v;
  __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) {
  uint8_t v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}
static inline uint64_t rdtsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((uint64_t)hi << 32) | lo;
}
static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
  __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}
static inline void lapic_write(uint32_t reg, uint32_t v) { *(volatile uint32_t *)((uint64_t)LAPIC_BASE + reg) = v; }
static inline uint32_t lapic_read(uint32_t reg) { return *(volatile uint32_t *)((uint64_t)LAPIC_BASE + reg); }

void guest_halt(void);                         /* CPL3: halt until the next interrupt (boot.S) */
void user_main(unsigned cpu);                  /* CPL3 entry, workload.c */
void regcheck_spin(const uint64_t *pattern, uint64_t *dump, uint64_t iterations, int avx); /* regcheck.S */

#endif /* __ASSEMBLER__ */
#endif
