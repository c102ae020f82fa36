/* A VMM that is not mig's, migrated by mig through its C API (mig/mig.h).
 *
 * It opens /dev/kvm, maps 1 MiB of guest memory and runs one vCPU in real mode on a payload
 * that counts, writing the count into one of 32 pages in turn and exiting to the VMM (OUT)
 * after each step, so the VMM can pause it at any point. Its state is its own: the
 * registers and segment registers, as two sections only this program reads, so the receiver
 * is this program too:
 *
 *   embed-vmm recv tcp:127.0.0.1:4444     # waits, receives, runs the guest on, checks it counts
 *   embed-vmm send tcp:127.0.0.1:4444     # runs the guest a moment, then migrates it
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mig/mig.h>

#define MEM_SIZE (1u << 20)
#define MEM_PAGES (MEM_SIZE / MIG_PAGE_SIZE)
#define CODE_ADDR 0x1000u
#define COUNTER_ADDR 0x500u

/* xor ax,ax; mov ds,ax; 1: inc dword [0x500]; es = 0x1000 + (count % 32) * 0x100;
 * mov [es:0], count; out 0x10, al; jmp 1b  (assembled with `as --32`, .code16) */
static const unsigned char payload[] = {0x31, 0xc0, 0x8e, 0xd8, 0x66, 0xff, 0x06, 0x00, 0x05, 0x8b, 0x1e, 0x00, 0x05,
                                        0x83, 0xe3, 0x1f, 0xc1, 0xe3, 0x08, 0x81, 0xc3, 0x00, 0x10, 0x8e, 0xc3, 0x66,
                                        0xa1, 0x00, 0x05, 0x26, 0x66, 0xa3, 0x00, 0x00, 0xe6, 0x10, 0xeb, 0xde};

struct vmm {
  int kvm, vm, vcpu;
  struct kvm_run* run;
  unsigned char* mem;
  struct kvm_userspace_memory_region slot;
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t changed;
  int pause_wanted, stopped, failed; /* the vCPU thread parks while pause_wanted */
  int manual_protect;                /* KVM_GET_DIRTY_LOG leaves pages unarmed until cleared */
};

static void die(const char* what) {
  perror(what);
  exit(1);
}

static int ioctl_or_errno(int fd, unsigned long request, void* arg) {
  return ioctl(fd, request, arg) < 0 ? -errno : 0;
}

/* The vCPU thread: runs the guest until told to pause, then completes the pending OUT
 * (immediate_exit) so the registers are consistent, and parks. */
static void* run_vcpu(void* arg) {
  struct vmm* v = arg;
  for (;;) {
    pthread_mutex_lock(&v->lock);
    if (v->pause_wanted) {
      v->run->immediate_exit = 1;
      ioctl(v->vcpu, KVM_RUN, 0); /* finishes the OUT and returns EINTR at once */
      v->run->immediate_exit = 0;
      v->stopped = 1;
      pthread_cond_broadcast(&v->changed);
      while (v->pause_wanted) pthread_cond_wait(&v->changed, &v->lock);
      v->stopped = 0;
    }
    pthread_mutex_unlock(&v->lock);
    if (ioctl(v->vcpu, KVM_RUN, 0) < 0 && errno != EINTR) die("KVM_RUN");
    if (v->run->exit_reason != KVM_EXIT_IO && v->run->exit_reason != KVM_EXIT_INTR) {
      fprintf(stderr, "embed-vmm: unexpected exit %u\n", v->run->exit_reason);
      pthread_mutex_lock(&v->lock);
      v->failed = v->stopped = 1;
      pthread_cond_broadcast(&v->changed);
      pthread_mutex_unlock(&v->lock);
      return NULL;
    }
  }
}

/* A VM with memory and one vCPU, paused; `load` puts the payload in and points the vCPU at it. */
static struct vmm* vmm_new(int load) {
  struct vmm* v = calloc(1, sizeof *v);
  struct kvm_sregs sregs;
  struct kvm_regs regs = {0};
  int run_size;
  if ((v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0) die("/dev/kvm");
  if ((v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0)) < 0) die("KVM_CREATE_VM");
  { /* where KVM has it: mig re-arms the dirty log just before it reads each stretch of pages */
    struct kvm_enable_cap manual = {.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                    .args = {KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE}};
    v->manual_protect = ioctl(v->kvm, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0 &&
                        ioctl(v->vm, KVM_ENABLE_CAP, &manual) == 0;
  }
  v->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (v->mem == MAP_FAILED) die("mmap");
  v->slot = (struct kvm_userspace_memory_region){0, 0, 0, MEM_SIZE, (unsigned long)v->mem};
  if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &v->slot) < 0) die("KVM_SET_USER_MEMORY_REGION");
  if ((v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0)) < 0) die("KVM_CREATE_VCPU");
  if ((run_size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0)) < 0) die("KVM_GET_VCPU_MMAP_SIZE");
  v->run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
  if (v->run == MAP_FAILED) die("mmap kvm_run");
  if (load) {
    memcpy(v->mem + CODE_ADDR, payload, sizeof payload);
    if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
  }
  pthread_mutex_init(&v->lock, NULL);
  pthread_cond_init(&v->changed, NULL);
  v->pause_wanted = 1;
  pthread_create(&v->thread, NULL, run_vcpu, v);
  return v;
}

static unsigned counter(const struct vmm* v) { return *(volatile unsigned*)(v->mem + COUNTER_ADDR); }

/* ---- the callbacks mig calls --------------------------------------------------------- */

static int set_logging(struct vmm* v, int on) {
  v->slot.flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  return ioctl_or_errno(v->vm, KVM_SET_USER_MEMORY_REGION, &v->slot);
}
static int start_dirty_log(void* opaque) { return set_logging(opaque, 1); }
static int stop_dirty_log(void* opaque) { return set_logging(opaque, 0); }

/* Under manual protection KVM_GET_DIRTY_LOG re-arms nothing: KVM_CLEAR_DIRTY_LOG re-arms the
 * pages it names (from a multiple of 64, for a multiple of 64 or to the slot's end). */
static int fetch_dirty_log_unarmed(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  struct vmm* v = opaque;
  struct kvm_dirty_log log = {0};
  if (region != 0 || words < MEM_PAGES / 64) return -EINVAL;
  log.slot = 0;
  log.dirty_bitmap = bitmap; /* KVM's layout is mig's: a bit per page, 64-bit words */
  return ioctl_or_errno(v->vm, KVM_GET_DIRTY_LOG, &log);
}

static int rearm_dirty_pages(void* opaque, size_t region, uint64_t first_page, const uint64_t* pages, size_t words) {
  struct vmm* v = opaque;
  struct kvm_clear_dirty_log clear = {0};
  if (region != 0 || first_page >= MEM_PAGES) return -EINVAL;
  clear.slot = 0;
  clear.first_page = first_page;
  clear.num_pages = (uint32_t)(words * 64 < MEM_PAGES - first_page ? words * 64 : MEM_PAGES - first_page);
  clear.dirty_bitmap = (void*)pages; /* only read */
  return ioctl_or_errno(v->vm, KVM_CLEAR_DIRTY_LOG, &clear);
}

static int fetch_dirty_log(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  const int failed = fetch_dirty_log_unarmed(opaque, region, bitmap, words);
  if (failed || !((struct vmm*)opaque)->manual_protect) return failed;
  return rearm_dirty_pages(opaque, region, 0, bitmap, words);
}

static int vm_pause(void* opaque) {
  struct vmm* v = opaque;
  int failed;
  pthread_mutex_lock(&v->lock);
  v->pause_wanted = 1;
  while (!v->stopped) pthread_cond_wait(&v->changed, &v->lock);
  failed = v->failed;
  pthread_mutex_unlock(&v->lock);
  return failed ? -EIO : 0;
}

static int vm_resume(void* opaque) {
  struct vmm* v = opaque;
  int failed;
  pthread_mutex_lock(&v->lock);
  v->pause_wanted = 0;
  pthread_cond_broadcast(&v->changed);
  failed = v->failed;
  pthread_mutex_unlock(&v->lock);
  return failed ? -EIO : 0;
}

static int save_state(void* opaque, mig_state_writer* out) {
  struct vmm* v = opaque;
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  if (ioctl(v->vcpu, KVM_GET_REGS, &regs) < 0 || ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0) return -errno;
  if (mig_state_add(out, "embed.regs", 1, &regs, sizeof regs) != MIG_OK ||
      mig_state_add(out, "embed.sregs", 1, &sregs, sizeof sregs) != MIG_OK)
    return -ENOMEM;
  return 0;
}

static int restore_state(void* opaque, const mig_state_section* s, size_t count) {
  struct vmm* v = opaque;
  if (count != 2 || strcmp(s[0].name, "embed.regs") || s[0].size != sizeof(struct kvm_regs) ||
      strcmp(s[1].name, "embed.sregs") || s[1].size != sizeof(struct kvm_sregs))
    return -EPROTO;
  if (ioctl(v->vcpu, KVM_SET_SREGS, s[1].data) < 0 || ioctl(v->vcpu, KVM_SET_REGS, s[0].data) < 0) return -errno;
  return 0;
}

static const mig_vm_ops ops = {start_dirty_log, stop_dirty_log, fetch_dirty_log, vm_pause,
                               vm_resume,       save_state,     restore_state,   NULL};

/* The guest memory is private anonymous: what the guest never touched reads as zero, and
 * round 0 skips it. */
static int populated_pages(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  struct vmm* v = opaque;
  (void)region;
  return mig_populated_pages(v->mem, MEM_SIZE, -1, bitmap, words) == MIG_OK ? 0 : -EINVAL;
}

static mig_vm* describe(struct vmm* v) {
  mig_memory_region region = {0, MEM_SIZE, v->mem};
  mig_vm* vm = NULL;
  if (mig_vm_new(&ops, v, 1, &region, 1, &vm) != MIG_OK || mig_vm_set_populated_pages(vm, populated_pages) != MIG_OK ||
      (v->manual_protect && mig_vm_set_late_rearm(vm, fetch_dirty_log_unarmed, rearm_dirty_pages) != MIG_OK))
    fprintf(stderr, "embed-vmm: %s\n", mig_last_error());
  return vm;
}

/* The receiver's factory: this VMM, empty, of the sender's shape, or no. */
static mig_vm* make_vm(void* opaque, const mig_vm_shape* shape) {
  struct vmm** made = opaque;
  if (shape->vcpus != 1 || shape->region_count != 1 || shape->regions[0].guest_addr != 0 ||
      shape->regions[0].size != MEM_SIZE)
    return NULL;
  *made = vmm_new(0);
  return describe(*made);
}

static int send_guest(const char* uri) {
  struct vmm* v = vmm_new(1);
  mig_vm* vm = describe(v);
  mig_send_options options;
  mig_migration* migration;
  mig_outcome outcome;
  vm_resume(v);
  usleep(300 * 1000);
  printf("source: the guest counts, at %u\n", counter(v));
  mig_send_options_init(&options);
  if (mig_migration_start(vm, uri, &options, &migration) != MIG_OK) {
    fprintf(stderr, "embed-vmm: %s\n", mig_last_error());
    return 1;
  }
  if (mig_migration_wait(migration, -1, &outcome) != MIG_OK) {
    fprintf(stderr, "embed-vmm: migration %s: %s (the guest runs on here)\n", mig_status_name(outcome.status), outcome.error);
    return 1;
  }
  printf("source: migrated at %u after %u rounds, %.1f ms downtime, %llu bytes%s\n", counter(v), outcome.rounds,
         outcome.downtime_ms, (unsigned long long)outcome.bytes, v->manual_protect ? ", dirty log re-armed late" : "");
  mig_migration_free(migration);
  mig_vm_free(vm);
  return 0;
}

static int receive_guest(const char* uri) {
  struct vmm* v = NULL;
  mig_recv_options options;
  mig_incoming* incoming;
  mig_outcome outcome;
  unsigned arrived;
  mig_recv_options_init(&options);
  if (mig_incoming_listen(uri, &options, make_vm, &v, &incoming) != MIG_OK) {
    fprintf(stderr, "embed-vmm: %s\n", mig_last_error());
    return 1;
  }
  printf("destination: listening on %s\n", mig_incoming_address(incoming));
  fflush(stdout);
  if (mig_incoming_wait(incoming, -1, &outcome) != MIG_OK) {
    fprintf(stderr, "embed-vmm: migration failed: %s\n", outcome.error);
    return 1;
  }
  arrived = counter(v);
  usleep(300 * 1000);
  printf("destination: arrived at %u, counts on to %u\n", arrived, counter(v));
  mig_incoming_free(incoming);
  return counter(v) > arrived && !v->failed ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc != 3 || (strcmp(argv[1], "send") && strcmp(argv[1], "recv"))) {
    fprintf(stderr, "usage: embed-vmm send|recv tcp:HOST:PORT\n  (built against mig %s)\n", mig_version());
    return 2;
  }
  return strcmp(argv[1], "send") == 0 ? send_guest(argv[2]) : receive_guest(argv[2]);
}
