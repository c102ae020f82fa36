/* The workload guest's CPL3 part: everything that loops lives here, because CPL3 runs
 * natively while CPL0 is emulated on this project's hosts.
 *
 * Command line (space-separated key=value; sizes take K/M/G):
 *   mode=idle|spin|random|hotcold|sweep   what each vCPU does       (idle)
 *                   idle halts between heartbeats (woken by the LAPIC timer); spin busy-waits
 *   wss=SIZE        working set, split evenly across vCPUs          (64M)
 *   rate=MBPS       dirtying rate per guest, in MB/s of pages; 0 = as fast as possible (0)
 *   fill=zero|random|text|mix   initial working-set contents        (random)
 *   hot=PCT hotfrac=PCT         hotcold: hot set size and share of writes (10, 90)
 *   timer=HZ        periodic LAPIC timer interrupts, counted at CPL0 (0 = off); an idle vCPU's
 *                   timer runs at least at twice the heartbeat rate, since it wakes the vCPU
 *   hb=MS           heartbeat period                                 (10)
 *   regcheck=1      keep patterns in GPRs and SSE/AVX registers and check them continuously
 *   cpus=N          wait for exactly N vCPUs instead of until no more arrive
 *   hbserial=1      also write one '.' to COM1 per heartbeat of vCPU 0, so a host that does
 *                   not implement the probe (QEMU) can timestamp heartbeats from the serial line
 *   compute=N       the last N vCPUs compute instead: chains of multiply-adds that touch no memory,
 *                   reported as units of work each heartbeat (MIG_PROBE_WORK), to show what slowing
 *                   the guest down costs a vCPU that dirties nothing; the others share wss and rate (0)
 *   seed=N
 *   disk=1          drive the first virtio-blk disk (legacy virtio-pci, found by PCI scan) from
 *                   vCPU 0: write 64 KiB blocks holding their number and a generation counter,
 *                   read each back after writing another, check it, and count the checks
 *   diskrate=MBPS   disk writes per second, in MB/s of blocks (1); each is followed by a read
 *   diskspan=SIZE   the part of the disk from offset 0 that is written     (64M)
 */
#include "guest.h"
#include "probe.h"

enum mode { MODE_IDLE, MODE_RANDOM, MODE_HOTCOLD, MODE_SWEEP, MODE_SPIN };
enum fill { FILL_ZERO, FILL_RANDOM, FILL_TEXT, FILL_MIX };

static struct {
  enum mode mode;
  uint64_t wss;
  uint64_t rate_mbps;
  enum fill fill;
  uint64_t hot_pct, hotfrac_pct;
  uint64_t timer_hz;
  uint64_t hb_ms;
  uint64_t regcheck;
  uint64_t cpus;
  uint64_t compute;
  uint64_t seed;
  uint64_t hbserial;
  uint64_t disk, disk_rate_mbps, disk_span;
} cfg = {.mode = MODE_IDLE, .wss = 64ul << 20, .fill = FILL_RANDOM, .hot_pct = 10, .hotfrac_pct = 90, .hb_ms = 10,
         .seed = 1, .disk_rate_mbps = 1, .disk_span = 64ul << 20};

static volatile uint64_t tsc_per_ms;
static volatile uint32_t ncpus;  /* published by the BSP once all APs have arrived */
/* The working set: low_pages pages from wss_base up to the PCI hole, the rest from 4 GiB. */
static uint64_t wss_base, low_pages;

/* 2 MiB carved off the start of the working set when disk=1, so that without a disk the
 * guest's memory layout stays as it was: */
#define DISK_AREA (2ul << 20)
static uint32_t *disk_gen;  /* 1 MiB: generation last written per block; 0 = never */
static uint8_t *disk_ring;  /* the virtqueue, at 1 MiB */
static uint8_t *disk_buf;   /* one block, at 1 MiB + 64 KiB */
#define DISK_RING_BYTES (4 * 4096 + 1024 * 24) /* room for the largest legacy queue */

extern const uint8_t ap_trampoline[], ap_trampoline_end[];

void *memset(void *d, int c, unsigned long n) {
  uint8_t *p = d;
  while (n--) *p++ = (uint8_t)c;
  return d;
}
void *memcpy(void *d, const void *s, unsigned long n) {
  uint8_t *p = d;
  const uint8_t *q = s;
  while (n--) *p++ = *q++;
  return d;
}

static void put(const char *s) {
  while (*s) outb(0x3f8, (uint8_t)*s++);
}
static void put_u64(uint64_t v) {
  char buf[21];
  int i = 20;
  buf[i] = 0;
  do buf[--i] = (char)('0' + v % 10);
  while (v /= 10);
  put(buf + i);
}

static int streq(const char *a, const char *b, unsigned n) {
  for (unsigned i = 0; i < n; i++)
    if (a[i] != b[i]) return 0;
  return b[n] == 0;
}
static uint64_t parse_u64(const char *s, unsigned n) {
  uint64_t v = 0;
  unsigned i = 0;
  for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (uint64_t)(s[i] - '0');
  if (i < n) {
    char suffix = s[i];
    if (suffix == 'K' || suffix == 'k') v <<= 10;
    if (suffix == 'M' || suffix == 'm') v <<= 20;
    if (suffix == 'G' || suffix == 'g') v <<= 30;
  }
  return v;
}

static void parse_arg(const char *key, unsigned klen, const char *val, unsigned vlen) {
  if (streq(key, "mode", klen)) {
    if (streq(val, "idle", vlen)) cfg.mode = MODE_IDLE;
    else if (streq(val, "random", vlen)) cfg.mode = MODE_RANDOM;
    else if (streq(val, "hotcold", vlen)) cfg.mode = MODE_HOTCOLD;
    else if (streq(val, "sweep", vlen)) cfg.mode = MODE_SWEEP;
    else if (streq(val, "spin", vlen)) cfg.mode = MODE_SPIN;
    else put("mig-guest: unknown mode\n");
  } else if (streq(key, "fill", klen)) {
    if (streq(val, "zero", vlen)) cfg.fill = FILL_ZERO;
    else if (streq(val, "random", vlen)) cfg.fill = FILL_RANDOM;
    else if (streq(val, "text", vlen)) cfg.fill = FILL_TEXT;
    else if (streq(val, "mix", vlen)) cfg.fill = FILL_MIX;
    else put("mig-guest: unknown fill\n");
  } else if (streq(key, "wss", klen)) cfg.wss = parse_u64(val, vlen);
  else if (streq(key, "rate", klen)) cfg.rate_mbps = parse_u64(val, vlen);
  else if (streq(key, "hot", klen)) cfg.hot_pct = parse_u64(val, vlen);
  else if (streq(key, "hotfrac", klen)) cfg.hotfrac_pct = parse_u64(val, vlen);
  else if (streq(key, "timer", klen)) cfg.timer_hz = parse_u64(val, vlen);
  else if (streq(key, "hb", klen)) cfg.hb_ms = parse_u64(val, vlen);
  else if (streq(key, "regcheck", klen)) cfg.regcheck = parse_u64(val, vlen);
  else if (streq(key, "cpus", klen)) cfg.cpus = parse_u64(val, vlen);
  else if (streq(key, "compute", klen)) cfg.compute = parse_u64(val, vlen);
  else if (streq(key, "seed", klen)) cfg.seed = parse_u64(val, vlen);
  else if (streq(key, "hbserial", klen)) cfg.hbserial = parse_u64(val, vlen);
  else if (streq(key, "disk", klen)) cfg.disk = parse_u64(val, vlen);
  else if (streq(key, "diskrate", klen)) cfg.disk_rate_mbps = parse_u64(val, vlen);
  else if (streq(key, "diskspan", klen)) cfg.disk_span = parse_u64(val, vlen);
  else put("mig-guest: unknown argument ignored\n");
}

static void parse_cmdline(const char *s) {
  while (*s) {
    while (*s == ' ') s++;
    const char *key = s;
    while (*s && *s != '=' && *s != ' ') s++;
    unsigned klen = (unsigned)(s - key);
    if (*s != '=') continue; /* a bare word (QEMU passes the kernel path first): skip */
    const char *val = ++s;
    while (*s && *s != ' ') s++;
    parse_arg(key, klen, val, (unsigned)(s - val));
  }
}

/* TSC ticks in 10 ms of PIT channel 2, the way Linux calibrates: the PIT runs at a fixed
 * 1.193182 MHz on every PC, QEMU's and mig's alike. */
static uint64_t calibrate_tsc_per_ms(void) {
  const uint16_t latch = 11932; /* 10 ms */
  outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
  outb(0x43, 0xb0);                                 /* channel 2, lo/hi byte, mode 0 */
  outb(0x42, latch & 0xff);
  outb(0x42, latch >> 8);
  uint64_t t0 = rdtsc();
  while (!(inb(0x61) & 0x20)) {
  }
  return (rdtsc() - t0) / 10;
}

static void report_failure(uint32_t code) { outl(MIG_PROBE_CHECK_FAIL, code); }
static void report_failure_disk_data(void) { report_failure(MIG_CHECK_FAIL_DISK_DATA); }

static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static void fill_page(uint8_t *page, enum fill f, uint64_t *rng) {
  static const char *const words[] = {"the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog ",
                                      "migration ", "memory ", "page ", "dirty ", "round ", "copy ", "and ", "of "};
  if (f == FILL_RANDOM) {
    for (unsigned i = 0; i < 4096; i += 8) *(uint64_t *)(page + i) = xorshift(rng);
  } else if (f == FILL_TEXT) {
    unsigned i = 0;
    while (i < 4096) {
      const char *w = words[xorshift(rng) & 15];
      while (*w && i < 4096) page[i++] = (uint8_t)*w++;
    }
  }
}

static void apic_icr(uint32_t low) {
  lapic_write(0x310, 0);
  lapic_write(0x300, low);
}

static void delay_us(uint64_t us) {
  uint64_t end = rdtsc() + us * tsc_per_ms / 1000;
  while (rdtsc() < end) __asm__ volatile("pause");
}

/* INIT then two STARTUPs to all other CPUs, each entering the trampoline at 0x8000. */
static void start_aps(void) {
  memcpy((void *)0x8000, ap_trampoline, (unsigned long)(ap_trampoline_end - ap_trampoline));
  apic_icr(0x000c4500);
  delay_us(10000);
  apic_icr(0x000c4608);
  delay_us(200);
  apic_icr(0x000c4608);
  /* Wait for the expected count, or until no new CPU arrives for 50 ms. */
  uint64_t last_change = rdtsc(), seen = cpus_started;
  while (cfg.cpus ? cpus_started < cfg.cpus && rdtsc() - last_change < 2000 * tsc_per_ms
                  : rdtsc() - last_change < 50 * tsc_per_ms) {
    if (cpus_started != seen) {
      seen = cpus_started;
      last_change = rdtsc();
    }
  }
}

static uint8_t *ws_page(uint64_t index) {
  return (uint8_t *)(index < low_pages ? wss_base + index * 4096 : (4ul << 30) + (index - low_pages) * 4096);
}

/* The ends of the RAM below the PCI hole and of the RAM from 4 GiB (0 if none), from the
 * multiboot memory map where there is one. */
static void find_memory(const uint32_t *mbi, uint64_t *low_end, uint64_t *high_end) {
  *low_end = 0x100000 + (uint64_t)mbi[2] * 1024;
  *high_end = 0;
  if (!(mbi[0] & 0x40)) return;
  const uint8_t *entry = (const uint8_t *)(uint64_t)mbi[12], *end = entry + mbi[11];
  for (; entry < end; entry += *(const uint32_t *)entry + 4) {
    uint64_t base = *(const uint64_t *)(entry + 4), length = *(const uint64_t *)(entry + 12);
    if (*(const uint32_t *)(entry + 20) != 1) continue; /* not RAM */
    if (base <= 0x100000 && base + length > *low_end) *low_end = base + length;
    if (base >= (4ul << 30) && base + length > *high_end) *high_end = base + length;
  }
  if (*high_end > (uint64_t)MAX_MEMORY_GIB << 30) *high_end = (uint64_t)MAX_MEMORY_GIB << 30;
}

/* boot.S maps the first 4 GiB; the rest is mapped here, at CPL3 (all guest memory is
 * user-accessible, page tables included), where loops run natively. */
static void map_high_memory(uint64_t high_end) {
  for (uint64_t gib = 4; gib < (high_end + (1ul << 30) - 1) >> 30; gib++) {
    uint64_t *pd = high_pds[gib - 4];
    for (uint64_t i = 0; i < 512; i++) pd[i] = (gib << 30) | (i << 21) | 0x87; /* present, writable, user, 2 MiB */
    /* Linked only once filled: a host that shadows page tables then traps one write per GiB,
     * not one per entry. A not-present entry is never cached, so no TLB flush is needed. */
    pdpt[gib] = (uint64_t)pd | 0x7;
  }
}

static void bsp_setup(void) {
  const uint32_t *mbi = (const uint32_t *)(uint64_t)mb_info_ptr;
  if (mbi[0] & 0x4) parse_cmdline((const char *)(uint64_t)mbi[4]);
  uint64_t low_end, high_end;
  find_memory(mbi, &low_end, &high_end);
  map_high_memory(high_end);
  wss_base = ((uint64_t)_end + (2ul << 20) - 1) & ~((2ul << 20) - 1);
  if (cfg.disk) {
    disk_gen = (uint32_t *)wss_base;  /* RAM the loader never wrote: zero */
    disk_ring = (uint8_t *)(wss_base + (1ul << 20));
    disk_buf = disk_ring + (64ul << 10);
    wss_base += DISK_AREA;
  }
  low_pages = (low_end - wss_base) / 4096;
  const uint64_t available = low_pages * 4096 + (high_end ? high_end - (4ul << 30) : 0);
  if (cfg.wss > available) cfg.wss = available & ~4095ul;
  if (cfg.hb_ms == 0) cfg.hb_ms = 1;
  tsc_per_ms = calibrate_tsc_per_ms();
  start_aps();
  const uint32_t arrived = cpus_started > MAX_CPUS ? MAX_CPUS : cpus_started;
  if (cfg.compute >= arrived) {
    put("mig-guest: compute= leaves no vCPU writing; all but one compute\n");
    cfg.compute = arrived - 1;
  }
  __asm__ volatile("" ::: "memory"); /* cfg is final before the APs are let go */
  ncpus = arrived;
  put("mig-guest: mode=");
  put_u64(cfg.mode);
  put(" wss_mib=");
  put_u64(cfg.wss >> 20);
  put(" wss_base=");
  put_u64(wss_base);
  put(" rate_mbps=");
  put_u64(cfg.rate_mbps);
  put(" cpus=");
  put_u64(ncpus);
  put(" tsc_khz=");
  put_u64(tsc_per_ms);
  put(" compute=");
  put_u64(cfg.compute);
  put("\n");
}

/* ---- The disk: a legacy virtio-pci block device, driven by polling from CPL3. ---- */

#define DISK_BLOCK 65536
#define DISK_MAX_BLOCKS (1u << 18) /* 16 GiB of span */
#define VQ_MAX 1024

struct vq_desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags, next;
};
struct blk_header {
  uint32_t type, reserved;
  uint64_t sector;
};

static struct {
  uint16_t io, qsize;
  struct vq_desc *desc;
  volatile uint16_t *avail; /* flags, idx, ring[] */
  volatile uint16_t *used;  /* flags, idx, then {u32 id, u32 len}[] */
  uint16_t next_avail, used_seen;
  uint64_t blocks;          /* in the span */
  int busy, writing;
  uint64_t block, last_written;
  uint32_t gen, checks;
  uint64_t credit, credit_per_ms, last_tsc; /* writes, in 2^-20 units: a loop pass earns a fraction */
  struct blk_header header;
  volatile uint8_t status;
} dk;

static uint32_t pci_read(uint32_t slot, uint32_t offset) {
  outl(0xcf8, 0x80000000u | slot << 11 | offset);
  return inl(0xcfc);
}

/* Reset, acknowledge, no features needed, one queue that never interrupts, driver ready. */
static int disk_init(void) {
  uint32_t slot = 0;
  for (; slot < 32 && pci_read(slot, 0) != 0x10011af4u; slot++) {
  }
  if (slot == 32) return 0;
  outl(0xcf8, 0x80000000u | slot << 11 | 4);
  outl(0xcfc, 0x5); /* I/O space and bus mastering */
  dk.io = (uint16_t)(pci_read(slot, 0x10) & ~3u);
  outb((uint16_t)(dk.io + 0x12), 0);
  outb((uint16_t)(dk.io + 0x12), 1);
  outb((uint16_t)(dk.io + 0x12), 3);
  outl((uint16_t)(dk.io + 0x04), 0);
  outw((uint16_t)(dk.io + 0x0e), 0);
  dk.qsize = inw((uint16_t)(dk.io + 0x0c));
  if (dk.qsize == 0 || dk.qsize > VQ_MAX) return 0;
  memset(disk_ring, 0, DISK_RING_BYTES);
  dk.desc = (struct vq_desc *)disk_ring;
  dk.avail = (volatile uint16_t *)(disk_ring + 16ul * dk.qsize);
  dk.used = (volatile uint16_t *)(disk_ring + ((16ul * dk.qsize + 6 + 2ul * dk.qsize + 4095) & ~4095ul));
  dk.avail[0] = 1; /* VRING_AVAIL_F_NO_INTERRUPT: this driver polls */
  outl((uint16_t)(dk.io + 0x08), (uint32_t)((uint64_t)disk_ring >> 12));
  outb((uint16_t)(dk.io + 0x12), 7);
  uint64_t sectors = inl((uint16_t)(dk.io + 0x14)) | (uint64_t)inl((uint16_t)(dk.io + 0x18)) << 32;
  uint64_t span = cfg.disk_span < sectors * 512 ? cfg.disk_span : sectors * 512;
  dk.blocks = span / DISK_BLOCK < DISK_MAX_BLOCKS ? span / DISK_BLOCK : DISK_MAX_BLOCKS;
  dk.credit_per_ms = cfg.disk_rate_mbps * 1000000ul * 16 / 1000; /* (MB/s / 64 KiB) << 20 */
  dk.last_tsc = rdtsc();
  return dk.blocks > 0;
}

/* A block's contents follow from its number and generation alone. */
static void disk_pattern(uint64_t *words, uint64_t block, uint32_t gen, int check) {
  uint64_t rng = block * 0x9e3779b97f4a7c15ul + gen + 1, bad = 0;
  for (unsigned i = 0; i < DISK_BLOCK / 8; i++) {
    uint64_t v = i == 0 ? 0x4b53494447494dul /* "MIGDISK" */ : i == 1 ? block : i == 2 ? gen : xorshift(&rng);
    if (check) bad |= words[i] ^ v;
    else words[i] = v;
  }
  if (check && bad) report_failure_disk_data();
}

static void disk_submit(int write, uint64_t block) {
  dk.header.type = write ? 1 : 0;
  dk.header.sector = block * (DISK_BLOCK / 512);
  dk.status = 0xff;
  dk.desc[0] = (struct vq_desc){(uint64_t)&dk.header, sizeof dk.header, 1, 1};
  dk.desc[1] = (struct vq_desc){(uint64_t)disk_buf, DISK_BLOCK, (uint16_t)(write ? 1 : 3), 2};
  dk.desc[2] = (struct vq_desc){(uint64_t)&dk.status, 1, 2, 0};
  dk.avail[2 + dk.next_avail % dk.qsize] = 0;
  __asm__ volatile("" ::: "memory"); /* x86 keeps stores in order; the compiler must too */
  dk.avail[1] = ++dk.next_avail;
  outw((uint16_t)(dk.io + 0x10), 0);
  dk.busy = 1;
  dk.writing = write;
  dk.block = block;
}

/* One step: finish the request in flight, if done; then a paced write, or a read-back of
 * the block written before the last one (so a check always crosses at least one write). */
static void disk_step(uint64_t now) {
  if (dk.busy) {
    if (dk.used[1] == dk.used_seen) return;
    dk.used_seen++;
    dk.busy = 0;
    if (dk.status != 0) {
      report_failure(MIG_CHECK_FAIL_DISK_IO);
      return;
    }
    if (dk.writing) {
      disk_gen[dk.block] = dk.gen;
      uint64_t previous = dk.last_written;
      dk.last_written = dk.block;
      if (disk_gen[previous]) disk_submit(0, previous);
      return;
    }
    disk_pattern((uint64_t *)disk_buf, dk.block, disk_gen[dk.block], 1);
    outl(MIG_PROBE_DISK_CHECKS, ++dk.checks);
  }
  uint64_t elapsed = now - dk.last_tsc;
  dk.last_tsc = now;
  if (elapsed > 10 * tsc_per_ms) elapsed = 10 * tsc_per_ms;
  dk.credit += elapsed * dk.credit_per_ms / tsc_per_ms;
  if (dk.credit > 10 * dk.credit_per_ms + (1u << 20)) dk.credit = 10 * dk.credit_per_ms + (1u << 20);
  if (dk.credit < 1u << 20) return;
  dk.credit -= 1u << 20;
  static uint64_t rng = 0x2545f4914f6cdd1dul;
  uint64_t block = xorshift(&rng) % dk.blocks;
  dk.gen = disk_gen[block] + 1;
  disk_pattern((uint64_t *)disk_buf, block, dk.gen, 0);
  disk_submit(1, block);
}

struct worker {
  unsigned cpu;
  uint64_t first;       /* this CPU's slice of the working set: pages first.. of ws_page() */
  uint64_t pages;
  uint64_t hot_pages;
  uint64_t rng;
  uint64_t credit;      /* pages this CPU may still write now, in 1/1024 units */
  uint64_t credit_per_ms;
  uint64_t last_tsc;
  uint64_t sweep_pos, sweep_pass;
  uint64_t counter;
  uint64_t work_units, work_state; /* a computing vCPU's: units since the last report, and its chain */
  int avx;
  uint64_t pattern[38], dump[38];
};


/* Pacing by TSC with bounded catch-up: a slow moment (a host preemption, a migration pause)
 * earns at most 10 ms of extra writes, never a long burst that starves heartbeats. */
static uint64_t writes_allowed(struct worker *w, uint64_t now) {
  if (cfg.rate_mbps == 0) return 256;
  uint64_t elapsed = now - w->last_tsc;
  w->last_tsc = now;
  if (elapsed > 10 * tsc_per_ms) elapsed = 10 * tsc_per_ms;
  w->credit += elapsed * w->credit_per_ms / tsc_per_ms;
  if (w->credit > 10 * w->credit_per_ms) w->credit = 10 * w->credit_per_ms;
  uint64_t n = w->credit >> 10;
  if (n > 256) n = 256;
  w->credit -= n << 10;
  return n;
}

static void write_random(struct worker *w, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) {
    uint64_t r = xorshift(&w->rng);
    uint64_t page;
    if (cfg.mode == MODE_HOTCOLD && w->hot_pages && (r >> 40) % 100 < cfg.hotfrac_pct)
      page = (r & 0xffffffff) % w->hot_pages;
    else
      page = (r & 0xffffffff) % w->pages;
    *(volatile uint64_t *)(ws_page(w->first + page) + ((r >> 32) & 0x1ff) * 8) = ++w->counter;
  }
}

/* Increment the first byte of each page in order, checking that it still holds what the
 * previous pass left: a page that lost a write during migration shows up here. */
static void write_sweep(struct worker *w, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) {
    volatile uint8_t *p = ws_page(w->first + w->sweep_pos);
    if (*p != (uint8_t)w->sweep_pass) report_failure(MIG_CHECK_FAIL_SWEEP);
    *p = (uint8_t)(w->sweep_pass + 1);
    if (++w->sweep_pos == w->pages) {
      w->sweep_pos = 0;
      w->sweep_pass++;
      outl(MIG_PROBE_SWEEP_PASS, (uint32_t)w->sweep_pass);
    }
  }
}

static void check_registers(struct worker *w, uint64_t iterations) {
  for (unsigned i = 0; i < 38; i++) w->pattern[i] = xorshift(&w->rng);
  regcheck_spin(w->pattern, w->dump, iterations, w->avx);
  for (unsigned i = 0; i < 6; i++)
    if (w->dump[i] != w->pattern[i]) report_failure(MIG_CHECK_FAIL_GPR);
  for (unsigned r = 0; r < 8; r++)
    for (unsigned q = 0; q < (w->avx ? 4u : 2u); q++)
      if (w->dump[6 + r * 4 + q] != w->pattern[6 + r * 4 + q]) report_failure(MIG_CHECK_FAIL_VEC);
}

/* One unit of work: a chain of 1024 multiply-adds (an LCG) that touches no memory, the same
 * unit as the synthetic guest's, so that a vCPU slowed down shows it and nothing else. */
static uint64_t compute_unit(uint64_t x) {
  for (int i = 0; i < 1024; i++) x = x * 6364136223846793005ul + 1442695040888963407ul;
  return x;
}
static volatile uint64_t work_sink; /* the work must be done */

static int have_avx(void) {
  uint32_t a, b, c, d;
  cpuid(1, &a, &b, &c, &d);
  if (!((c >> 28) & 1) || !((c >> 27) & 1)) return 0; /* AVX and OSXSAVE */
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 6) == 6;
}

static void run_worker(unsigned cpu) {
  struct worker w = {0};
  w.cpu = cpu;
  /* The vCPUs that write share the working set and the rate; the computing ones come last. */
  const uint64_t writers = ncpus - cfg.compute;
  const int computing = cpu >= writers;
  uint64_t slice = computing ? 0 : (cfg.wss / writers) & ~4095ul;
  w.first = slice / 4096 * cpu;
  w.pages = slice / 4096;
  w.hot_pages = w.pages * cfg.hot_pct / 100;
  w.rng = cfg.seed * 0x9e3779b97f4a7c15ul + cpu + 1;
  w.avx = have_avx();
  /* MB/s of 4 KiB pages, across the guest, shared evenly by the CPUs that write; 1/1024 units. */
  w.credit_per_ms = cfg.rate_mbps * 1000000ul / 4096 * 1024 / 1000 / writers;

  if (cfg.mode != MODE_SWEEP && cfg.fill != FILL_ZERO)
    for (uint64_t p = 0; p < w.pages; p++)
      fill_page(ws_page(w.first + p), cfg.fill == FILL_MIX ? (enum fill)(p % 3 + FILL_ZERO) : cfg.fill, &w.rng);

  /* An idle vCPU halts, so something must wake it for each heartbeat: the LAPIC timer, at
   * the heartbeat rate unless a timer rate was asked for. The register check needs a
   * running vCPU, so it keeps the vCPU spinning instead. */
  const int disk = cpu == 0 && cfg.disk;
  if (disk && !disk_init()) {
    report_failure(MIG_CHECK_FAIL_DISK_IO);
    put("mig-guest: no usable virtio-blk disk\n");
  }
  const int halts = cfg.mode == MODE_IDLE && !cfg.regcheck && !disk && !computing;
  /* A halted vCPU wakes at least twice per heartbeat, so a beat is at most half a period late. */
  const uint64_t wake_hz = halts ? 2000 / cfg.hb_ms + 1 : 0;
  const uint64_t timer_hz = cfg.timer_hz > wake_hz ? cfg.timer_hz : wake_hz;
  if (timer_hz) {
    lapic_write(0x3e0, 0x3);                                     /* divide by 16 */
    lapic_write(0x320, 0x20000 | TIMER_VECTOR);                  /* periodic */
    lapic_write(0x380, (uint32_t)(1000000000ul / 16 / timer_hz)); /* KVM's APIC bus: 1 GHz */
  }
  outl(MIG_PROBE_READY, cfg.mode);
  if (cpu == 0) put("mig-guest: ready\n");
  const int serial_heartbeat = cpu == 0 && cfg.hbserial;

  const uint64_t hb_ticks = cfg.hb_ms * tsc_per_ms;
  const uint64_t timer_deadline = cfg.timer_hz ? (10000 / cfg.timer_hz + 10) * tsc_per_ms : 0;
  uint64_t seq = 0, prev = rdtsc(), next_hb = prev, last_ticks = 0, last_tick_tsc = prev;
  int timer_reported = 0;
  w.last_tsc = prev;
  for (;;) {
    uint64_t now = rdtsc();
    if (now < prev) report_failure(MIG_CHECK_FAIL_TSC);
    /* Iterations take microseconds; a long gap means this vCPU did not run (host preemption,
     * a migration pause). Ticks missed then are not the timer's fault: restart its window. */
    if (now - prev > tsc_per_ms) last_tick_tsc = now;
    prev = now;
    if (now >= next_hb) {
      outl(MIG_PROBE_HEARTBEAT, (uint32_t)++seq);
      if (serial_heartbeat) outb(0x3f8, '.');
      if (cfg.timer_hz) outl(MIG_PROBE_TICKS, (uint32_t)percpu_of(cpu)->ticks);
      if (computing) {
        outl(MIG_PROBE_WORK, (uint32_t)w.work_units);
        w.work_units = 0;
        work_sink = w.work_state;
      }
      /* The next beat is due one period on, but never in the past: no bursts after a stall. */
      next_hb += hb_ticks;
      if (next_hb <= now) next_hb = now + hb_ticks;
    }
    if (cfg.timer_hz) {
      uint64_t ticks = percpu_of(cpu)->ticks;
      if (ticks != last_ticks) {
        last_ticks = ticks;
        last_tick_tsc = now;
        timer_reported = 0;
      } else if (now - last_tick_tsc > timer_deadline && !timer_reported) {
        report_failure(MIG_CHECK_FAIL_TICKS);
        timer_reported = 1;
      }
    }
    if (disk && dk.blocks) disk_step(now);
    if (computing) {
      w.work_state = compute_unit(w.work_state);
      w.work_units++;
    }
    uint64_t n = computing || cfg.mode == MODE_IDLE || cfg.mode == MODE_SPIN ? 0 : writes_allowed(&w, now);
    if (cfg.mode == MODE_SWEEP) write_sweep(&w, n);
    else if (n) write_random(&w, n);
    if (cfg.regcheck) check_registers(&w, 20000);
    else if (halts) guest_halt();
    else if (n == 0 && !computing) for (int i = 0; i < 64; i++) __asm__ volatile("pause");
  }
}

void user_main(unsigned cpu) {
  if (cpu == 0) bsp_setup();
  else
    while (!ncpus || !tsc_per_ms) __asm__ volatile("pause");
  if (cpu < ncpus) run_worker(cpu);
  for (;;) __asm__ volatile("pause");
}
