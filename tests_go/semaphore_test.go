package tests_go

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/self-limiters/self-limiters/core"
)

// newSemaphore returns a new participant of the semaphore name, with an owner id of its own,
// as another process would have.
func newSemaphore(t testing.TB, rdb *redis.Client, name string, capacity int64, expiry time.Duration) *core.Semaphore {
	t.Helper()
	sem, err := core.NewSemaphore(rdb, core.SemaphoreConfig{Name: name, Capacity: capacity, Expiry: expiry})
	if err != nil {
		t.Fatalf("NewSemaphore failed: %v", err)
	}
	return sem
}

// acquire calls Acquire and fails the test on an error. The lease is released when the test
// ends, which does nothing when the test released it already.
func acquire(t testing.TB, ctx context.Context, sem *core.Semaphore, maxWait time.Duration) *core.Lease {
	t.Helper()
	lease, err := sem.Acquire(ctx, maxWait)
	if err != nil {
		t.Fatalf("Acquire with maximum wait %v failed: %v", maxWait, err)
	}
	t.Cleanup(func() { _ = lease.Release(context.Background()) })
	return lease
}

// release calls Release and fails the test on an error.
func release(t testing.TB, ctx context.Context, lease *core.Lease) {
	t.Helper()
	if err := lease.Release(ctx); err != nil {
		t.Fatalf("Release failed: %v", err)
	}
}

// requireNoSlot checks that a new participant with the given expiry cannot get a slot within
// maxWait, which shows that every slot is held.
func requireNoSlot(t testing.TB, ctx context.Context, rdb *redis.Client, name string, capacity int64, expiry time.Duration, reason string) {
	t.Helper()
	const maxWait = 300 * time.Millisecond
	probe := newSemaphore(t, rdb, name, capacity, expiry)
	lease, err := probe.Acquire(ctx, maxWait)
	if err == nil {
		_ = lease.Release(ctx)
		t.Fatalf("expected no free slot (%s), but a new participant acquired one", reason)
	}
	if !errors.Is(err, core.ErrMaxSleepExceeded) {
		t.Fatalf("expected a new participant to fail with ErrMaxSleepExceeded (%s), got %v", reason, err)
	}
}

func TestSemaphoreCapacityReached(t *testing.T) {
	t.Parallel()
	const capacity = 3
	rdb := newClient(t)
	name := uniqueName(t)
	sem := newSemaphore(t, rdb, name, capacity, 10*time.Second)
	ctx := testContext(t, 30*time.Second)

	for range capacity {
		acquire(t, ctx, sem, 100*time.Millisecond)
	}
	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != capacity {
		t.Fatalf("expected %d members in the holders set, got %d", capacity, n)
	}
	requireNoSlot(t, ctx, rdb, name, capacity, 10*time.Second, "all slots are taken")
}

func TestSemaphoreMaxWaitFreeSlot(t *testing.T) {
	t.Parallel()
	rdb := newClient(t)
	sem := newSemaphore(t, rdb, uniqueName(t), 1, 10*time.Second)
	ctx := testContext(t, 30*time.Second)

	// The maximum wait limits waiting in the queue only, so a free slot is granted at once.
	lease, err := sem.Acquire(ctx, time.Nanosecond)
	if err != nil {
		t.Fatalf("expected Acquire with a maximum wait of 1ns to get the free slot, got %v", err)
	}
	release(t, ctx, lease)
}

func TestSemaphoreCapacityNeverExceeded(t *testing.T) {
	t.Parallel()
	const capacity = 3
	const participants = 4
	const workers = 16
	const rounds = 4
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)

	sems := make([]*core.Semaphore, participants)
	for i := range sems {
		sems[i] = newSemaphore(t, rdb, name, capacity, 10*time.Second)
	}

	var holding, maxHolding atomic.Int64
	var mu sync.Mutex
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}

	var wg sync.WaitGroup
	for worker := range workers {
		sem := sems[worker%participants]
		wg.Go(func() {
			for range rounds {
				lease, err := sem.Acquire(ctx, 0)
				if err != nil {
					fail("worker %d: Acquire failed: %v", worker, err)
					return
				}

				n := holding.Add(1)
				for {
					seen := maxHolding.Load()
					if n <= seen || maxHolding.CompareAndSwap(seen, n) {
						break
					}
				}
				if inRedis, err := rdb.ZCard(ctx, semaphoreKey(name, "holders")).Result(); err != nil {
					fail("worker %d: ZCARD failed: %v", worker, err)
				} else if inRedis > capacity {
					fail("worker %d: expected at most %d members in the holders set, got %d", worker, capacity, inRedis)
				}
				time.Sleep(10 * time.Millisecond)
				holding.Add(-1)

				if err := lease.Release(ctx); err != nil {
					fail("worker %d: Release failed: %v", worker, err)
					return
				}
			}
		})
	}
	wg.Wait()

	if len(failures) > 0 {
		t.Fatalf("expected no failure, got %d, the first: %s", len(failures), failures[0])
	}
	if got := maxHolding.Load(); got > capacity {
		t.Fatalf("expected at most %d holders at once, got %d", capacity, got)
	}
	if got := maxHolding.Load(); got < capacity {
		t.Fatalf("expected %d workers on %d slots to fill all of them at some point, got at most %d holders at once", workers, capacity, got)
	}
	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != 0 {
		t.Fatalf("expected an empty holders set after every release, got %d members", n)
	}
}

func TestSemaphoreFIFOCapacityOne(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name            string
		sharedValue     bool
		separateWakeups bool // each waiter reads its wake-ups through a client of its own
	}{
		{"ValuePerWaiter", false, false},
		{"SharedValue", true, false},
		{"WakeClient", false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const waiters = 5
			// Check-ins come every expiry/3 = 10s, so only wake-ups admit a waiter sooner.
			const expiry = 30 * time.Second
			const handoverLimit = 5 * time.Second
			rdb := newClient(t)
			name := uniqueName(t)
			ctx := testContext(t, 60*time.Second)
			shared := newSemaphore(t, rdb, name, 1, expiry)
			holder := acquire(t, ctx, shared, 0)

			var mu sync.Mutex
			var order []int
			results := make(chan error, waiters)
			for i := range waiters {
				sem := shared
				switch {
				case tc.separateWakeups:
					var err error
					sem, err = core.NewSemaphore(rdb, core.SemaphoreConfig{
						Name:       name,
						Capacity:   1,
						Expiry:     expiry,
						WakeClient: newClient(t),
					})
					if err != nil {
						t.Fatalf("NewSemaphore with a WakeClient failed: %v", err)
					}
				case !tc.sharedValue:
					sem = newSemaphore(t, rdb, name, 1, expiry)
				}
				go func() {
					lease, err := sem.Acquire(ctx, 0)
					if err != nil {
						results <- fmt.Errorf("waiter %d: Acquire failed: %w", i, err)
						return
					}
					mu.Lock()
					order = append(order, i)
					mu.Unlock()
					results <- lease.Release(ctx)
				}()

				// Start the next waiter only once this one is queued, so the queue order is known.
				waitForZCard(t, rdb, semaphoreKey(name, "waiters"), int64(i+1), 10*time.Second)
			}

			released := time.Now()
			release(t, ctx, holder)
			for range waiters {
				if err := <-results; err != nil {
					t.Fatalf("expected every waiter to acquire and release, got %v", err)
				}
			}
			if elapsed := time.Since(released); elapsed > handoverLimit {
				t.Fatalf("expected each release to wake the next waiter, so that %d handovers take less than %v, got %v", waiters, handoverLimit, elapsed)
			}
			want := []int{0, 1, 2, 3, 4}
			if !slices.Equal(order, want) {
				t.Fatalf("expected waiters to be admitted in queue order %v, got %v", want, order)
			}
		})
	}
}

func TestSemaphoreMaxWaitHoldsNothing(t *testing.T) {
	t.Parallel()
	const maxWait = 300 * time.Millisecond
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 30*time.Second)
	holder := acquire(t, ctx, newSemaphore(t, rdb, name, 1, 10*time.Second), 0)
	waiter := newSemaphore(t, rdb, name, 1, 10*time.Second)

	start := time.Now()
	lease, err := waiter.Acquire(ctx, maxWait)
	elapsed := time.Since(start)
	if !errors.Is(err, core.ErrMaxSleepExceeded) {
		if lease != nil {
			_ = lease.Release(ctx)
		}
		t.Fatalf("expected Acquire on a full semaphore to fail with ErrMaxSleepExceeded, got %v", err)
	}
	if lease != nil {
		t.Fatalf("expected no lease with the error, got %v", lease)
	}
	if elapsed < maxWait {
		t.Fatalf("expected Acquire to wait the maximum wait of %v before failing, but it failed after %v", maxWait, elapsed)
	}

	// The waiter gives its place in the queue back in the background.
	waitForZCard(t, rdb, semaphoreKey(name, "waiters"), 0, 5*time.Second)
	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != 1 {
		t.Fatalf("expected only the holder in the holders set, got %d members", n)
	}
	release(t, ctx, holder)
	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != 0 {
		t.Fatalf("expected an empty holders set after the holder released, because the waiter that gave up holds nothing, got %d members", n)
	}
}

func TestSemaphoreCanceledWhileWaiting(t *testing.T) {
	t.Parallel()
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 30*time.Second)
	holder := acquire(t, ctx, newSemaphore(t, rdb, name, 1, 10*time.Second), 0)
	waiter := newSemaphore(t, rdb, name, 1, 10*time.Second)

	waitCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		lease *core.Lease
		err   error
	}
	done := make(chan result, 1)
	go func() {
		lease, err := waiter.Acquire(waitCtx, 0)
		done <- result{lease, err}
	}()
	waitForZCard(t, rdb, semaphoreKey(name, "waiters"), 1, 10*time.Second)
	cancel()

	var got result
	select {
	case got = <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("expected Acquire to return after its context was canceled, still waiting after 10s")
	}
	if !errors.Is(got.err, context.Canceled) {
		if got.lease != nil {
			_ = got.lease.Release(ctx)
		}
		t.Fatalf("expected Acquire to fail with context.Canceled, got %v", got.err)
	}
	if got.lease != nil {
		t.Fatalf("expected no lease with the error, got %v", got.lease)
	}

	waitForZCard(t, rdb, semaphoreKey(name, "waiters"), 0, 5*time.Second)
	release(t, ctx, holder)
	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != 0 {
		t.Fatalf("expected an empty holders set after the holder released, because the canceled waiter holds nothing, got %d members", n)
	}
}

func TestSemaphoreGiveUpRaceHoldsNothing(t *testing.T) {
	t.Parallel()
	const rounds = 20
	const giveUpAfter = 50 * time.Millisecond
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)
	holderSem := newSemaphore(t, rdb, name, 1, 10*time.Second)
	waiterSem := newSemaphore(t, rdb, name, 1, 10*time.Second)

	// Each round releases the slot at about the moment the waiter gives up, by its maximum wait
	// in even rounds and by its context in odd ones. Whatever wins, nothing may stay held.
	for round := range rounds {
		holder := acquire(t, ctx, holderSem, 0)
		waitCtx, cancel := context.WithTimeout(ctx, giveUpAfter)
		maxWait := time.Duration(0)
		if round%2 == 0 {
			maxWait = giveUpAfter
		}
		type result struct {
			lease *core.Lease
			err   error
		}
		done := make(chan result, 1)
		go func() {
			lease, err := waiterSem.Acquire(waitCtx, maxWait)
			done <- result{lease, err}
		}()
		time.Sleep(giveUpAfter)
		release(t, ctx, holder)

		got := <-done
		cancel()
		switch {
		case got.err == nil:
			release(t, ctx, got.lease)
		case !errors.Is(got.err, core.ErrMaxSleepExceeded) && !errors.Is(got.err, context.DeadlineExceeded):
			t.Fatalf("round %d: expected the waiter to get the slot or give up, got error %v", round, got.err)
		}
	}

	waitFor(t, 5*time.Second, func() (bool, string) {
		holders := zcard(t, rdb, semaphoreKey(name, "holders"))
		waiters := zcard(t, rdb, semaphoreKey(name, "waiters"))
		return holders == 0 && waiters == 0, fmt.Sprintf("expected no holder and no waiter after every round, got %d holders and %d waiters", holders, waiters)
	})
	acquire(t, ctx, newSemaphore(t, rdb, name, 1, 10*time.Second), time.Millisecond)
}

func TestSemaphoreAcquireDoneContext(t *testing.T) {
	t.Parallel()
	rdb := newClient(t)
	name := uniqueName(t)
	sem := newSemaphore(t, rdb, name, 1, 10*time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()

	lease, err := sem.Acquire(ctx, 0)
	if !errors.Is(err, context.Canceled) {
		if lease != nil {
			_ = lease.Release(context.Background())
		}
		t.Fatalf("expected Acquire with a canceled context to fail with context.Canceled, got %v", err)
	}
	if keys := limiterKeys(t, rdb, "sem", name); len(keys) != 0 {
		t.Fatalf("expected Acquire with a canceled context to write nothing to Redis, got keys %v", keys)
	}
}

func TestSemaphoreReleaseTwice(t *testing.T) {
	t.Parallel()
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 30*time.Second)
	sem := newSemaphore(t, rdb, name, 1, 10*time.Second)

	first := acquire(t, ctx, sem, 0)
	release(t, ctx, first)
	second := acquire(t, ctx, sem, time.Second)

	if err := first.Release(ctx); err != nil {
		t.Fatalf("expected a second Release of the same lease to return nil, got %v", err)
	}
	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != 1 {
		t.Fatalf("expected the second lease to stay in the holders set after the first lease was released again, got %d members", n)
	}
	requireNoSlot(t, ctx, rdb, name, 1, 10*time.Second, "the second lease still holds the only slot")
	release(t, ctx, second)
}

func TestSemaphoreCrashedHolderExpires(t *testing.T) {
	t.Parallel()
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)
	child := startCrashChild(t, name, crashModeHold)

	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != 1 {
		t.Fatalf("expected the crash child in the holders set, got %d members", n)
	}
	sem := newSemaphore(t, rdb, name, 1, crashChildExpiry)
	type result struct {
		lease *core.Lease
		err   error
	}
	done := make(chan result, 1)
	go func() {
		lease, err := sem.Acquire(ctx, 0)
		done <- result{lease, err}
	}()
	waitForZCard(t, rdb, semaphoreKey(name, "waiters"), 1, 10*time.Second)

	// The live child renews its lease, so the waiter gets nothing while the child runs.
	select {
	case got := <-done:
		t.Fatalf("expected the waiter to wait while the crash child lives, got lease %v and error %v", got.lease, got.err)
	case <-time.After(crashChildExpiry + 500*time.Millisecond):
	}

	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("cannot kill the crash child: %v", err)
	}
	killed := time.Now()
	const margin = 2 * time.Second
	select {
	case got := <-done:
		if got.err != nil {
			t.Fatalf("expected the waiter to get the slot of the killed child, got %v", got.err)
		}
		t.Cleanup(func() { _ = got.lease.Release(context.Background()) })
		if elapsed := time.Since(killed); elapsed > crashChildExpiry+margin {
			t.Fatalf("expected the waiter to get the slot within %v of the kill, got it after %v", crashChildExpiry+margin, elapsed)
		}
		release(t, ctx, got.lease)
	case <-time.After(crashChildExpiry + margin):
		t.Fatalf("expected the waiter to get the slot within %v of the kill, still waiting", crashChildExpiry+margin)
	}
}

func TestSemaphoreCrashedWaiterSkipped(t *testing.T) {
	t.Parallel()
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)
	waitersKey := semaphoreKey(name, "waiters")
	// Every participant uses the child's expiry, because each script call sets the idle lifetime
	// of the shared keys to the caller's expiry.
	holder := acquire(t, ctx, newSemaphore(t, rdb, name, 1, crashChildExpiry), 0)

	child := startCrashChild(t, name, crashModeWait)
	waitForZCard(t, rdb, waitersKey, 1, 30*time.Second)
	queued, err := rdb.ZRange(ctx, waitersKey, 0, -1).Result()
	if err != nil {
		t.Fatalf("ZRANGE %s failed: %v", waitersKey, err)
	}
	deadToken := queued[0]
	childOwner, _, found := strings.Cut(deadToken, ":")
	if !found {
		t.Fatalf("expected a waiter token of the form <owner>:<sequence number>, got %q", deadToken)
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("cannot kill the crash child: %v", err)
	}

	// Once the killed child stops checking in, its alive key expires.
	aliveKey := semaphoreKey(name, "alive:"+childOwner)
	waitFor(t, crashChildExpiry+3*time.Second, func() (bool, string) {
		n, err := rdb.Exists(ctx, aliveKey).Result()
		return err == nil && n == 0, fmt.Sprintf("expected key %s of the killed child to expire, got EXISTS %d and error %v", aliveKey, n, err)
	})

	// A live waiter queues behind the dead one.
	type result struct {
		lease *core.Lease
		err   error
	}
	liveWaiter := newSemaphore(t, rdb, name, 1, crashChildExpiry)
	done := make(chan result, 1)
	go func() {
		lease, err := liveWaiter.Acquire(ctx, 0)
		done <- result{lease, err}
	}()
	waitForZCard(t, rdb, waitersKey, 2, 10*time.Second)

	release(t, ctx, holder)
	if _, err := rdb.ZScore(ctx, semaphoreKey(name, "holders"), deadToken).Result(); !errors.Is(err, redis.Nil) {
		t.Fatalf("expected the killed child's token %s to get no slot, got ZSCORE error %v", deadToken, err)
	}
	select {
	case got := <-done:
		if got.err != nil {
			t.Fatalf("expected the live waiter behind the killed child to get the slot, got %v", got.err)
		}
		release(t, ctx, got.lease)
	case <-time.After(5 * time.Second):
		t.Fatalf("expected the live waiter behind the killed child to get the slot at the release, still waiting after 5s")
	}
}

func TestSemaphoreDeadlineDuringCallHoldsNothing(t *testing.T) {
	t.Parallel()
	const rounds = 300
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)
	sem := newSemaphore(t, rdb, name, 1, 10*time.Second)
	if err := rdb.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING failed: %v", err)
	}

	// Deadlines from 0 to 300µs end some calls before, some during and some after the script
	// runs on the server. Whichever it is, a failed Acquire must leave nothing behind.
	for round := range rounds {
		callCtx, cancel := context.WithTimeout(ctx, time.Duration(round%60*5)*time.Microsecond)
		lease, err := sem.Acquire(callCtx, 0)
		cancel()
		if err == nil {
			release(t, ctx, lease)
			continue
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("round %d: expected Acquire to succeed or fail with context.DeadlineExceeded, got %v", round, err)
		}
	}

	waitFor(t, 5*time.Second, func() (bool, string) {
		holders := zcard(t, rdb, semaphoreKey(name, "holders"))
		waiters := zcard(t, rdb, semaphoreKey(name, "waiters"))
		return holders == 0 && waiters == 0, fmt.Sprintf("expected no holder and no waiter after every round, got %d holders and %d waiters", holders, waiters)
	})
}

func TestSemaphoreLiveHolderKeepsSlot(t *testing.T) {
	t.Parallel()
	const expiry = 1500 * time.Millisecond
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)
	holder := acquire(t, ctx, newSemaphore(t, rdb, name, 1, expiry), 0)

	// A waiter checks the holders set until it gives up after three lease lengths.
	waiter := newSemaphore(t, rdb, name, 1, expiry)
	lease, err := waiter.Acquire(ctx, 3*expiry)
	if err == nil {
		_ = lease.Release(ctx)
		t.Fatalf("expected the holder to keep its slot for %v through renewals, but a waiter acquired it", 3*expiry)
	}
	if !errors.Is(err, core.ErrMaxSleepExceeded) {
		t.Fatalf("expected the waiter to fail with ErrMaxSleepExceeded, got %v", err)
	}
	if err := holder.Release(ctx); err != nil {
		t.Fatalf("expected Release after %v of holding to succeed, got %v", 3*expiry, err)
	}
}

func TestSemaphoreShortExpiryKeepsLongLease(t *testing.T) {
	t.Parallel()
	const long, short = 10 * time.Second, 200 * time.Millisecond
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 30*time.Second)
	holder := acquire(t, ctx, newSemaphore(t, rdb, name, 1, long), 0)

	// Each failed probe touches the shared keys with its short expiry; the holder's lease must
	// outlive them, since it runs for the long expiry.
	requireNoSlot(t, ctx, rdb, name, 1, short, "first probe with a short expiry")
	time.Sleep(5 * short)
	requireNoSlot(t, ctx, rdb, name, 1, short, "probe after the short expiry passed")
	release(t, ctx, holder)
}

func TestSemaphoreLeaseLost(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		expiry time.Duration
		remove func(ctx context.Context, rdb *redis.Client, holdersKey string) error
		// settle is the pause between the removal and Release. When it exceeds Expiry/3, the
		// holder's renewal finds the lease gone first.
		settle time.Duration
		want   error
	}{
		{
			// The lease's deadline has passed, as for a holder stopped past its expiry; the
			// next script reclaims it and records it as lost.
			name:   "Expired",
			expiry: 10 * time.Second,
			remove: expireOnlyLease,
			want:   core.ErrLeaseLost,
		},
		{
			name:   "ZREMFoundByRenewal",
			expiry: 300 * time.Millisecond,
			remove: zremOnlyLease,
			settle: time.Second,
			want:   core.ErrLeaseLost,
		},
		{
			name:   "DELFoundByRenewal",
			expiry: 300 * time.Millisecond,
			remove: func(ctx context.Context, rdb *redis.Client, holdersKey string) error {
				return rdb.Del(ctx, holdersKey).Err()
			},
			settle: time.Second,
			want:   core.ErrLeaseLost,
		},
		{
			// A lease removed by hand just before its release cannot be told from one that an
			// earlier run of the same release gave back, so Release reports success; the slot
			// of the new holder is left alone either way.
			name:   "ZREMJustBeforeRelease",
			expiry: 10 * time.Second,
			remove: zremOnlyLease,
			want:   nil,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rdb := newClient(t)
			name := uniqueName(t)
			ctx := testContext(t, 30*time.Second)
			holdersKey := semaphoreKey(name, "holders")
			lease := acquire(t, ctx, newSemaphore(t, rdb, name, 1, tc.expiry), 0)

			if err := tc.remove(ctx, rdb, holdersKey); err != nil {
				t.Fatalf("removing the lease from %s failed: %v", holdersKey, err)
			}
			time.Sleep(tc.settle)
			other := acquire(t, ctx, newSemaphore(t, rdb, name, 1, tc.expiry), time.Second)

			err := lease.Release(ctx)
			if !errors.Is(err, tc.want) {
				t.Fatalf("expected Release of the removed lease to return %v, got %v", tc.want, err)
			}
			if n := zcard(t, rdb, holdersKey); n != 1 {
				t.Fatalf("expected the new holder to keep its slot after the lost lease was released, got %d members in the holders set", n)
			}
			requireNoSlot(t, ctx, rdb, name, 1, tc.expiry, "the new holder keeps the only slot")
			release(t, ctx, other)
		})
	}
}

// expireOnlyLease moves the deadline of the only lease of the holders set into the past.
func expireOnlyLease(ctx context.Context, rdb *redis.Client, holdersKey string) error {
	members, err := rdb.ZRange(ctx, holdersKey, 0, -1).Result()
	if err != nil {
		return err
	}
	if len(members) != 1 {
		return fmt.Errorf("expected one lease in %s, got %d", holdersKey, len(members))
	}
	return rdb.ZAdd(ctx, holdersKey, redis.Z{Score: 1, Member: members[0]}).Err()
}

// zremOnlyLease removes the only lease of the holders set with ZREM, as an operator would remove
// a lease by hand.
func zremOnlyLease(ctx context.Context, rdb *redis.Client, holdersKey string) error {
	members, err := rdb.ZRange(ctx, holdersKey, 0, -1).Result()
	if err != nil {
		return err
	}
	if len(members) != 1 {
		return fmt.Errorf("expected one lease in %s, got %d", holdersKey, len(members))
	}
	return rdb.ZRem(ctx, holdersKey, members[0]).Err()
}

func TestSemaphoreScriptFlush(t *testing.T) {
	t.Parallel()
	const expiry = 600 * time.Millisecond
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 30*time.Second)
	sem := newSemaphore(t, rdb, name, 1, expiry)
	scriptFlush := func() {
		t.Helper()
		if err := rdb.ScriptFlush(ctx).Err(); err != nil {
			t.Fatalf("SCRIPT FLUSH failed: %v", err)
		}
	}

	lease := acquire(t, ctx, sem, 0)
	scriptFlush()
	// Renewals must load their script again, or the lease expires.
	time.Sleep(3 * expiry)

	scriptFlush()
	requireNoSlot(t, ctx, rdb, name, 1, expiry, "the holder renewed its lease after SCRIPT FLUSH")

	scriptFlush()
	if err := lease.Release(ctx); err != nil {
		t.Fatalf("expected Release after SCRIPT FLUSH to succeed, got %v", err)
	}

	scriptFlush()
	lease = acquire(t, ctx, sem, 0)
	release(t, ctx, lease)
}

func TestSemaphoreKeysExpire(t *testing.T) {
	t.Parallel()
	const expiry = 500 * time.Millisecond
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 30*time.Second)
	holder := acquire(t, ctx, newSemaphore(t, rdb, name, 1, expiry), 0)

	// A waiter of another participant creates the queue, the ticket counter, its alive key and,
	// once admitted, its wake-up list.
	waiter := newSemaphore(t, rdb, name, 1, expiry)
	done := make(chan error, 1)
	go func() {
		lease, err := waiter.Acquire(ctx, 0)
		if err != nil {
			done <- err
			return
		}
		done <- lease.Release(ctx)
	}()
	waitForZCard(t, rdb, semaphoreKey(name, "waiters"), 1, 10*time.Second)

	keys := limiterKeys(t, rdb, "sem", name)
	for _, suffix := range []string{"holders", "waiters", "tickets"} {
		if !slices.Contains(keys, semaphoreKey(name, suffix)) {
			t.Fatalf("expected key %s while a holder and a waiter exist, got keys %v", semaphoreKey(name, suffix), keys)
		}
	}
	for _, key := range keys {
		ttl, err := rdb.PTTL(ctx, key).Result()
		if err != nil {
			t.Fatalf("PTTL %s failed: %v", key, err)
		}
		if ttl <= 0 || ttl > expiry {
			t.Fatalf("expected key %s to expire within the expiry of %v, got PTTL %v", key, expiry, ttl)
		}
	}

	release(t, ctx, holder)
	if err := <-done; err != nil {
		t.Fatalf("expected the waiter to acquire and release, got %v", err)
	}
	waitFor(t, expiry+3*time.Second, func() (bool, string) {
		keys := limiterKeys(t, rdb, "sem", name)
		return len(keys) == 0, "expected no key of the idle semaphore to remain, got " + strings.Join(keys, ", ")
	})
}

func TestSemaphoreWrongType(t *testing.T) {
	t.Parallel()
	rdb := newClient(t)
	name := uniqueName(t)
	ctx := testContext(t, 30*time.Second)
	sem := newSemaphore(t, rdb, name, 1, 10*time.Second)

	if err := rdb.Set(ctx, semaphoreKey(name, "holders"), "not a sorted set", time.Minute).Err(); err != nil {
		t.Fatalf("SET of the holders key failed: %v", err)
	}
	lease, err := sem.Acquire(ctx, 0)
	if err == nil {
		_ = lease.Release(ctx)
	}
	requireRedisError(t, err, "Acquire on a holders key that holds a string")
	if !strings.Contains(err.Error(), "WRONGTYPE") {
		t.Fatalf("expected the error to contain the WRONGTYPE reply, got %v", err)
	}
}

func TestSemaphoreClosedPort(t *testing.T) {
	t.Parallel()
	sem, err := core.NewSemaphore(closedPortClient(t), core.SemaphoreConfig{
		Name:     uniqueName(t),
		Capacity: 1,
		Expiry:   time.Second,
	})
	if err != nil {
		t.Fatalf("NewSemaphore failed: %v", err)
	}
	_, err = sem.Acquire(testContext(t, 30*time.Second), 0)
	requireRedisError(t, err, "Acquire on a closed port")
}

func TestSemaphoreInvalidConfig(t *testing.T) {
	t.Parallel()
	valid := core.SemaphoreConfig{Name: "x", Capacity: 1, Expiry: time.Second}
	cases := []struct {
		name   string
		change func(*core.SemaphoreConfig)
	}{
		{"ZeroCapacity", func(c *core.SemaphoreConfig) { c.Capacity = 0 }},
		{"NegativeCapacity", func(c *core.SemaphoreConfig) { c.Capacity = -1 }},
		{"CapacityAboveMax", func(c *core.SemaphoreConfig) { c.Capacity = core.MaxCapacity + 1 }},
		{"ZeroExpiry", func(c *core.SemaphoreConfig) { c.Expiry = 0 }},
		{"ExpiryBelowMin", func(c *core.SemaphoreConfig) { c.Expiry = core.MinExpiry - time.Millisecond }},
		{"ExpiryAboveMax", func(c *core.SemaphoreConfig) { c.Expiry = core.MaxDuration + time.Millisecond }},
	}
	rdb := closedPortClient(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := valid
			tc.change(&cfg)
			_, err := core.NewSemaphore(rdb, cfg)
			if !errors.Is(err, core.ErrInvalidArgument) {
				t.Fatalf("expected NewSemaphore(%+v) to fail with ErrInvalidArgument, got %v", cfg, err)
			}
		})
	}
	if _, err := core.NewSemaphore(rdb, valid); err != nil {
		t.Fatalf("expected NewSemaphore(%+v) to succeed, got %v", valid, err)
	}
}
