/*
 * Thin C helpers compiled into pykvm._binding.
 *
 * They exist so that errno is read in C immediately after the system call
 * (cffi releases the GIL around them, so KVM_RUN can be kicked from another
 * thread), and so that the benchmark has a C loop over KVM_RUN to compare the
 * Python exit path against, measured on the same vCPU in the same process.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

/* Names for kvm_run's anonymous exit payloads, so cffi can check their layout. */
typedef __typeof__(((struct kvm_run *)0)->hw) pykvm_exit_hw;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) pykvm_exit_fail_entry;
typedef __typeof__(((struct kvm_run *)0)->ex) pykvm_exit_ex;
typedef __typeof__(((struct kvm_run *)0)->io) pykvm_exit_io;
typedef __typeof__(((struct kvm_run *)0)->debug) pykvm_exit_debug;
typedef __typeof__(((struct kvm_run *)0)->mmio) pykvm_exit_mmio;
typedef __typeof__(((struct kvm_run *)0)->hypercall) pykvm_exit_hypercall;
typedef __typeof__(((struct kvm_run *)0)->internal) pykvm_exit_internal;
typedef __typeof__(((struct kvm_run *)0)->emulation_failure) pykvm_exit_emulation_failure;
typedef __typeof__(((struct kvm_run *)0)->system_event) pykvm_exit_system_event;
typedef __typeof__(((struct kvm_run *)0)->msr) pykvm_exit_msr;
typedef __typeof__(((struct kvm_run *)0)->tpr_access) pykvm_exit_tpr_access;
typedef __typeof__(((struct kvm_run *)0)->eoi) pykvm_exit_eoi;
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u) pykvm_hyperv_u;
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u.synic) pykvm_hyperv_synic;
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u.hcall) pykvm_hyperv_hcall;
typedef __typeof__(((struct kvm_hyperv_exit *)0)->u.syndbg) pykvm_hyperv_syndbg;
typedef __typeof__(((struct kvm_nested_state *)0)->hdr) pykvm_nested_state_hdr;
typedef __typeof__(((struct kvm_vcpu_events *)0)->exception) pykvm_events_exception;
typedef __typeof__(((struct kvm_vcpu_events *)0)->interrupt) pykvm_events_interrupt;
typedef __typeof__(((struct kvm_vcpu_events *)0)->nmi) pykvm_events_nmi;
typedef __typeof__(((struct kvm_vcpu_events *)0)->smi) pykvm_events_smi;
typedef __typeof__(((struct kvm_vcpu_events *)0)->triple_fault) pykvm_events_triple_fault;
typedef __typeof__(((struct kvm_irqchip *)0)->chip) pykvm_irqchip_u;
typedef __typeof__(((struct kvm_irq_routing_entry *)0)->u) pykvm_routing_u;

#ifndef KVM_MAX_CPUID_ENTRIES
#define KVM_MAX_CPUID_ENTRIES 256
#endif

/* ioctl(2) returning -errno on failure instead of -1. */
static int pykvm_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int pykvm_ioctl_value(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/*
 * The kick signal: a handler that does nothing, installed without SA_RESTART,
 * so that the signal makes a blocked KVM_RUN return EINTR in whichever thread
 * it is sent to, without involving Python's signal machinery.
 */
static void pykvm_kick_handler(int signo)
{
    (void)signo;
}

static int pykvm_install_kick_handler(int signo)
{
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = pykvm_kick_handler;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL) < 0 ? -errno : 0;
}

/* The time-stamp counter, for latency measurements against the guest's own rdtsc. */
static unsigned long long pykvm_rdtsc(void)
{
    return __builtin_ia32_rdtsc();
}

/* KVM_RUN; returns the exit reason (>= 0), or -errno. */
static int pykvm_run(int fd, struct kvm_run *run)
{
    int r = ioctl(fd, KVM_RUN, 0);
    return r < 0 ? -errno : (int)run->exit_reason;
}

/* One vCPU's run guard: who may use its kvm_run page, and which thread is in KVM_RUN.
 * state: 0 idle; 1 running (inside KVM_RUN, or its exit still being read); 2 closed.
 * pykvm_run_guarded takes 0 -> 1 itself (unless the caller holds it already: held = 1),
 * so two threads can never both run a vCPU, and
 * leaves it at 1 until the caller has read the exit (pykvm_guard_release); close takes
 * 0 -> 2 (pykvm_guard_close), so kvm_run is never unmapped under a reader. */
struct pykvm_vcpu_guard {
    int state;
    int closing;              /* set first by close: no new run starts, even while state is 0 */
    unsigned long thread;     /* pthread_self() of the thread inside KVM_RUN, 0 when none */
    int tid;                  /* that thread's kernel id (gettid), where kicks are sent */
    unsigned int run_epoch;   /* counts the runs (never 0), stored before tid and thread */
    unsigned int kick_epoch;  /* the run a kick signal was sent to, 0 when none */
};

/* The kernel id of the calling thread, once read (kicks are sent to it with tgkill). */
static __thread pid_t pykvm_thread_tid;

#define PYKVM_GUARD_BUSY (-100000)
#define PYKVM_GUARD_CLOSED (-100001)

static int pykvm_guard_acquire(struct pykvm_vcpu_guard *guard);
static void pykvm_guard_release(struct pykvm_vcpu_guard *guard);

/* KVM_RUN under the guard. Returns -errno, a guard code, the exit reason, or, for the
 * commonest exit (KVM_EXIT_IO of one element of at most 4 bytes), the whole exit packed
 * into one number, so that Python reads nothing from kvm_run:
 *   bits 0-7 KVM_EXIT_IO, bit 8 direction, bits 9-11 size, bit 12 PYKVM_PACKED_IO,
 *   bits 13-28 port, bits 29-60 the element (little-endian): always positive.
 * The shifts are exported to Python, whose one decoder of this number is
 * pykvm.core.exits.IoExit.from_packed.
 * A packed exit and an error (-errno, including EINTR) have already released the guard;
 * for any other exit the caller reads kvm_run and then calls pykvm_guard_release. */
#define PYKVM_IO_DIRECTION_SHIFT 8
#define PYKVM_IO_SIZE_SHIFT 9
#define PYKVM_PACKED_IO 0x1000
#define PYKVM_IO_PORT_SHIFT 13
#define PYKVM_IO_DATA_SHIFT 29

static long long pykvm_run_guarded(int fd, struct kvm_run *run, struct pykvm_vcpu_guard *guard, int held)
{
    if (!held) {
        int taken = pykvm_guard_acquire(guard);
        if (taken)
            return taken;
    }
    if (!pykvm_thread_tid)
        pykvm_thread_tid = (pid_t)syscall(SYS_gettid);
    unsigned int epoch = guard->run_epoch + 1;          /* only the guard's holder writes it */
    __atomic_store_n(&guard->run_epoch, epoch ? epoch : 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&guard->tid, (int)pykvm_thread_tid, __ATOMIC_SEQ_CST);
    __atomic_store_n(&guard->thread, (unsigned long)pthread_self(), __ATOMIC_SEQ_CST);
    int r = ioctl(fd, KVM_RUN, 0);
    int err = errno;
    __atomic_store_n(&guard->thread, 0UL, __ATOMIC_RELEASE);
    if (r < 0) {
        /* Nothing to read from kvm_run: give the guard back here, so that a Python
         * exception raised right after this call (Ctrl-C's KeyboardInterrupt) cannot
         * leave it taken. EINTR consumed the kick, if any. */
        if (err == EINTR)
            run->immediate_exit = 0;
        pykvm_guard_release(guard);
        return -err;
    }
    if (run->exit_reason == KVM_EXIT_IO && run->io.count == 1 && run->io.size <= 4) {
        uint32_t value = 0;
        memcpy(&value, (const char *)run + run->io.data_offset, run->io.size);
        pykvm_guard_release(guard);      /* nothing more is read from kvm_run for this exit */
        return (long long)KVM_EXIT_IO | (long long)(run->io.direction & 1) << PYKVM_IO_DIRECTION_SHIFT
               | (long long)run->io.size << PYKVM_IO_SIZE_SHIFT | PYKVM_PACKED_IO
               | (long long)run->io.port << PYKVM_IO_PORT_SHIFT | (long long)value << PYKVM_IO_DATA_SHIFT;
    }
    return (long long)run->exit_reason;
}

/* Take the guard without running (to write kvm_run or complete an exit); same results. */
static int pykvm_guard_acquire(struct pykvm_vcpu_guard *guard)
{
    int idle = 0;
    if (!__atomic_compare_exchange_n(&guard->state, &idle, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return idle == 2 ? PYKVM_GUARD_CLOSED : PYKVM_GUARD_BUSY;
    if (__atomic_load_n(&guard->closing, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&guard->state, 0, __ATOMIC_RELEASE);
        return PYKVM_GUARD_CLOSED;
    }
    return 0;
}

static void pykvm_guard_release(struct pykvm_vcpu_guard *guard)
{
    __atomic_store_n(&guard->state, 0, __ATOMIC_RELEASE);
}

/* Mark closing (no run starts any more), then 0 -> 2 if idle: returns 1 when the vCPU is
 * now closed to runs, 0 while a run is still in progress (kick it and call again). */
static int pykvm_guard_close(struct pykvm_vcpu_guard *guard)
{
    int idle = 0;
    __atomic_store_n(&guard->closing, 1, __ATOMIC_RELEASE);
    return __atomic_compare_exchange_n(&guard->state, &idle, 2, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
           || __atomic_load_n(&guard->state, __ATOMIC_ACQUIRE) == 2;
}

static unsigned long pykvm_guard_thread(struct pykvm_vcpu_guard *guard)
{
    return __atomic_load_n(&guard->thread, __ATOMIC_ACQUIRE);
}

/*
 * Send signo to the thread inside KVM_RUN under guard, unless none is, or a kick signal
 * was sent to this same run already. One is enough: it was sent to the run's thread after
 * its sender set immediate_exit and saw the run's thread published, so it arrives while
 * this KVM_RUN runs (EINTR), or before it entered the guest, and then KVM_RUN sees
 * immediate_exit and returns at once: either way the run ends. So a storm of kicks sends
 * one signal per run. That matters: each real-time signal sent with tgkill (pthread_kill)
 * takes an entry of the user's pending-signal queue, which RLIMIT_SIGPENDING bounds for all
 * of the user's processes together, and beyond it the send fails with EAGAIN: one signal
 * per kick filled it in a storm. When other processes keep it full, the send is tried
 * again every PYKVM_KICK_RETRY_NS for up to PYKVM_KICK_WAIT_NS while the run goes on.
 * Sent to the kernel thread id: no pthread_t of a thread that may have ended is read.
 * Returns 1 sent, 0 nothing to send, -errno.
 */
#define PYKVM_KICK_WAIT_NS 1000000000L
#define PYKVM_KICK_RETRY_NS 500000L

static int pykvm_guard_kick(struct pykvm_vcpu_guard *guard, int signo)
{
    /* The caller's store to immediate_exit before the loads (the runner stores the thread
     * before KVM_RUN reads immediate_exit): one of the two sides sees the other's. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    unsigned int epoch = __atomic_load_n(&guard->run_epoch, __ATOMIC_SEQ_CST);
    unsigned long thread = __atomic_load_n(&guard->thread, __ATOMIC_SEQ_CST);
    int tid = __atomic_load_n(&guard->tid, __ATOMIC_SEQ_CST);
    /* No run, or a new one began since: its entry sees immediate_exit. Otherwise thread and
     * tid belong to this run (stored after its epoch, cleared before the next). */
    if (!thread || __atomic_load_n(&guard->run_epoch, __ATOMIC_SEQ_CST) != epoch)
        return 0;
    unsigned int sent = __atomic_load_n(&guard->kick_epoch, __ATOMIC_SEQ_CST);
    do {
        if (sent == epoch)
            return 0;
    } while (!__atomic_compare_exchange_n(&guard->kick_epoch, &sent, epoch, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    const struct timespec pause = {0, PYKVM_KICK_RETRY_NS};
    for (long waited = 0;; waited += PYKVM_KICK_RETRY_NS) {
        if (syscall(SYS_tgkill, getpid(), tid, signo) == 0)
            return 1;
        int err = errno;
        int running = __atomic_load_n(&guard->run_epoch, __ATOMIC_SEQ_CST) == epoch
                      && __atomic_load_n(&guard->thread, __ATOMIC_SEQ_CST);
        if (err == EAGAIN && running && waited < PYKVM_KICK_WAIT_NS) {
            nanosleep(&pause, NULL);
            continue;
        }
        __atomic_compare_exchange_n(&guard->kick_epoch, &epoch, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        if (err == ESRCH || (err == EAGAIN && !running))
            return 0;           /* the thread is gone, or its run ended meanwhile */
        return -err;
    }
}

/* Shared mapping of fd (the vCPU's kvm_run) or, with fd < 0, anonymous memory. */
static void *pykvm_mmap(int fd, size_t size, int *err)
{
    void *p = fd < 0
        ? mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    *err = 0;
    return p;
}

static int pykvm_munmap(void *addr, size_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

/*
 * The benchmark's C baseline: KVM_RUN `iterations` times, requiring each exit
 * to be an OUT to `port` (the guest loops on `out`). Returns iterations done,
 * -errno on an ioctl error, or -(1000 + exit_reason) on any other exit.
 */
static long pykvm_bench_run_loop(int fd, struct kvm_run *run, long iterations, unsigned int port)
{
    for (long i = 0; i < iterations; i++) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason != KVM_EXIT_IO || run->io.port != port)
            return -(1000 + (long)run->exit_reason);
    }
    return iterations;
}

/*
 * The same loop through pykvm_run_guarded, as Vcpu.run() makes each KVM_RUN: the run guard
 * taken and given back, the running thread published for kicks, the IO exit packed. Its
 * difference from pykvm_bench_run_loop is what the guard costs per exit, measured in C.
 * Returns iterations done, -errno or a guard code, or -(1000 + exit_reason) on any other exit.
 */
static long pykvm_bench_guarded_loop(int fd, struct kvm_run *run, struct pykvm_vcpu_guard *guard, long iterations,
                                     unsigned int port)
{
    for (long i = 0; i < iterations; i++) {
        long long r = pykvm_run_guarded(fd, run, guard, 0);
        if (r > PYKVM_PACKED_IO && (r >> PYKVM_IO_PORT_SHIFT & 0xFFFF) == port)
            continue;
        if (r < 0)
            return (long)r;                    /* -errno or a guard code: the guard is not held */
        if (r < PYKVM_PACKED_IO)
            pykvm_guard_release(guard);        /* a plain exit leaves the guard to its caller */
        return -(1000 + (long)(r & 0xFF));
    }
    return iterations;
}

/*
 * The injection benchmark's C baseline: `n` times, stamp the TSC into sent[i],
 * send one interrupt (kind 0: KVM_SIGNAL_MSI of *msi on vm_fd; kind 1: write 1
 * to the irqfd eventfd `fd`), then wait until the guest's vector log count
 * (*log_count, in guest memory) moves, at most timeout_cycles per interrupt,
 * looking every poll_ns nanoseconds (the Python injector waits the same way,
 * so both leave the host CPUs equally free for the vCPU).
 * Returns how many interrupts were delivered, or -errno if a send failed.
 */
static long pykvm_bench_inject(int kind, int fd, const struct kvm_msi *msi,
                               volatile unsigned int *log_count, long n,
                               unsigned long long *sent, unsigned long long timeout_cycles,
                               long poll_ns)
{
    const struct timespec poll = {0, poll_ns};

    for (long i = 0; i < n; i++) {
        unsigned int before = *log_count;
        sent[i] = __builtin_ia32_rdtsc();
        if (kind == 0) {
            if (ioctl(fd, KVM_SIGNAL_MSI, msi) < 0)
                return -errno;
        } else {
            uint64_t one = 1;
            if (write(fd, &one, sizeof(one)) != sizeof(one))
                return -errno;
        }
        while (*log_count == before) {
            if (__builtin_ia32_rdtsc() - sent[i] > timeout_cycles)
                return i;
            nanosleep(&poll, NULL);
        }
    }
    return n;
}
