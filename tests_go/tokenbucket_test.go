package tests_go

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/self-limiters/self-limiters/core"
)

// newBucket returns a token bucket with a unique name on a fresh client whose connection is
// already open, so that the first Reserve of a test is not slowed down by the dial.
func newBucket(t *testing.T, capacity int64, period time.Duration, amount int64) (*core.TokenBucket, *redis.Client, string) {
	t.Helper()
	rdb := newClient(t)
	if err := rdb.Ping(context.Background()).Err(); err != nil {
		t.Fatalf("PING failed: %v", err)
	}
	name := uniqueName(t)
	bucket, err := core.NewTokenBucket(rdb, core.TokenBucketConfig{
		Name:         name,
		Capacity:     capacity,
		RefillPeriod: period,
		RefillAmount: amount,
	})
	if err != nil {
		t.Fatalf("NewTokenBucket failed: %v", err)
	}
	return bucket, rdb, name
}

// reserveNow calls Reserve without a maximum wait and fails the test on an error.
func reserveNow(t *testing.T, ctx context.Context, bucket *core.TokenBucket) time.Duration {
	t.Helper()
	wait, err := bucket.Reserve(ctx, 0)
	if err != nil {
		t.Fatalf("Reserve failed: %v", err)
	}
	return wait
}

func TestTokenBucketFreshBucket(t *testing.T) {
	t.Parallel()
	const capacity = 5
	const period = time.Second
	bucket, _, _ := newBucket(t, capacity, period, 1)
	ctx := testContext(t, 30*time.Second)

	start := time.Now()
	for i := range capacity {
		if wait := reserveNow(t, ctx, bucket); wait != 0 {
			t.Fatalf("expected reservation %d of a fresh bucket of capacity %d to wait 0, got %v", i+1, capacity, wait)
		}
	}
	wait := reserveNow(t, ctx, bucket)
	elapsed := time.Since(start)

	// The first refill comes one period after the first reservation, which happened after start.
	if wait > period {
		t.Fatalf("expected the reservation after the capacity to wait at most one period (%v), got %v", period, wait)
	}
	if minimum := period - elapsed - time.Millisecond; wait < minimum {
		t.Fatalf("expected the reservation after the capacity to wait at least %v (one period minus the %v the calls took), got %v", minimum, elapsed, wait)
	}
}

func TestTokenBucketRefillAfterIdle(t *testing.T) {
	t.Parallel()
	const capacity = 4
	const amount = 2
	const period = 1500 * time.Millisecond
	bucket, _, _ := newBucket(t, capacity, period, amount)
	ctx := testContext(t, 30*time.Second)

	// The refills follow a fixed schedule from the first reservation, which the server runs
	// between start and start+firstCall.
	start := time.Now()
	reserveNow(t, ctx, bucket)
	firstCall := time.Since(start)
	for range capacity - 1 {
		reserveNow(t, ctx, bucket)
	}

	// Idle past the first refill and well before the second one.
	time.Sleep(time.Until(start.Add(period + 300*time.Millisecond)))
	for i := range amount {
		if wait := reserveNow(t, ctx, bucket); wait != 0 {
			t.Fatalf("expected reservation %d after one refill of %d tokens to wait 0, got %v (%v after the first reservation)", i+1, amount, wait, time.Since(start))
		}
	}
	callStart := time.Now()
	wait := reserveNow(t, ctx, bucket)
	callEnd := time.Now()
	if elapsed := callEnd.Sub(start); elapsed >= 2*period {
		t.Fatalf("expected the reservations to end before the second refill, %v after the first one, but they ended after %v, so the machine is too slow for this test", 2*period, elapsed)
	}

	// The next token is the second refill, two periods after the first reservation. The slack
	// allows for the Redis server's wall clock and the test's monotonic clock drifting apart over
	// the 3 s of the test, which reached 4 ms on a loaded machine.
	const slack = 50 * time.Millisecond
	if latest := start.Add(firstCall + 2*period + slack).Sub(callStart); wait > latest {
		t.Fatalf("expected the reservation after the %d refilled tokens to wait until the second refill, at most %v, got %v", amount, latest, wait)
	}
	if earliest := start.Add(2*period - slack).Sub(callEnd); wait < earliest {
		t.Fatalf("expected the reservation after the %d refilled tokens to wait until the second refill, at least %v, got %v", amount, earliest, wait)
	}
}

func TestTokenBucketCappedAfterLongIdle(t *testing.T) {
	t.Parallel()
	const capacity = 3
	const amount = 3
	const period = time.Second
	bucket, rdb, name := newBucket(t, capacity, period, amount)
	ctx := testContext(t, 30*time.Second)

	start := time.Now()
	for range capacity {
		reserveNow(t, ctx, bucket)
	}

	// Two refills of 3 tokens would give 6 tokens without the cap. Reserving half a period after
	// a refill keeps the burst away from the next refill.
	time.Sleep(time.Until(start.Add(2*period + period/2)))
	for i := range capacity {
		if wait := reserveNow(t, ctx, bucket); wait != 0 {
			t.Fatalf("expected reservation %d after a long idle to wait 0, got %v", i+1, wait)
		}
	}
	wait := reserveNow(t, ctx, bucket)
	if wait <= 0 {
		tokens, _ := rdb.HGet(ctx, bucketKey(name), "tokens").Result()
		t.Fatalf("expected reservation %d after a long idle to wait, because the bucket holds at most %d tokens, got %v (%v after the first reservation, tokens field now %q)",
			capacity+1, capacity, wait, time.Since(start), tokens)
	}
	if wait > period {
		t.Fatalf("expected reservation %d after a long idle to wait at most one period (%v), got %v", capacity+1, period, wait)
	}
}

func TestTokenBucketFIFOSchedule(t *testing.T) {
	t.Parallel()
	const reservations = 8
	const period = time.Second
	bucket, _, _ := newBucket(t, 1, period, 1)
	ctx := testContext(t, 30*time.Second)

	starts := make([]time.Time, reservations)
	durations := make([]time.Duration, reservations)
	waits := make([]time.Duration, reservations)
	for i := range reservations {
		starts[i] = time.Now()
		waits[i] = reserveNow(t, ctx, bucket)
		durations[i] = time.Since(starts[i])
	}

	if waits[0] != 0 {
		t.Fatalf("expected the first reservation of a fresh bucket to wait 0, got %v", waits[0])
	}
	for i := 1; i < reservations; i++ {
		if waits[i] <= waits[i-1] {
			t.Fatalf("expected reservation %d to wait longer than reservation %d (%v), got %v", i+1, i, waits[i-1], waits[i])
		}

		// Each reservation gets the token one period after the previous one. The calls' own
		// durations bound how far the local clock can place their server time.
		gap := starts[i].Add(waits[i]).Sub(starts[i-1].Add(waits[i-1]))
		slack := durations[i] + durations[i-1] + 5*time.Millisecond
		if gap < period-slack || gap > period+slack {
			t.Fatalf("expected the token of reservation %d to come %v ± %v after that of reservation %d, got %v", i+1, period, slack, i, gap)
		}
	}
}

func TestTokenBucketConcurrentReservationsDistinct(t *testing.T) {
	t.Parallel()
	const reservations = 10
	const period = 5 * time.Second
	bucket, _, _ := newBucket(t, 1, period, 1)
	ctx := testContext(t, 30*time.Second)

	var mu sync.Mutex
	var waits []time.Duration
	var failures []error
	var wg sync.WaitGroup
	start := time.Now()
	for range reservations {
		wg.Go(func() {
			wait, err := bucket.Reserve(ctx, 0)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failures = append(failures, err)
				return
			}
			waits = append(waits, wait)
		})
	}
	wg.Wait()
	span := time.Since(start)

	if len(failures) > 0 {
		t.Fatalf("expected every Reserve to succeed, got %d errors, the first: %v", len(failures), failures[0])
	}
	slices.Sort(waits)
	if waits[0] != 0 {
		t.Fatalf("expected one reservation of a fresh bucket of capacity 1 to wait 0, got shortest wait %v", waits[0])
	}
	if waits[1] == 0 {
		t.Fatalf("expected only one reservation of a fresh bucket of capacity 1 to wait 0, got at least two")
	}

	// Reservation k in server order waits k periods minus its delay after the first one, and
	// every delay is below the span of all calls.
	for i := 1; i < reservations; i++ {
		if gap := waits[i] - waits[i-1]; gap <= period-span-time.Millisecond {
			t.Fatalf("expected sorted waits to be about one period (%v) apart, got %v then %v (all calls took %v)", period, waits[i-1], waits[i], span)
		}
	}
}

func TestTokenBucketMaxWaitTakesNoToken(t *testing.T) {
	t.Parallel()
	const period = 2 * time.Second
	bucket, rdb, name := newBucket(t, 1, period, 1)
	ctx := testContext(t, 30*time.Second)

	reserveNow(t, ctx, bucket)
	stateBefore, err := rdb.HGetAll(ctx, bucketKey(name)).Result()
	if err != nil {
		t.Fatalf("HGETALL of the bucket failed: %v", err)
	}

	wait, err := bucket.Reserve(ctx, 500*time.Millisecond)
	if !errors.Is(err, core.ErrMaxSleepExceeded) {
		t.Fatalf("expected Reserve with a maximum wait of 500ms on an empty bucket to fail with ErrMaxSleepExceeded, got wait %v and error %v", wait, err)
	}
	if wait != 0 {
		t.Fatalf("expected a rejected Reserve to return a zero wait, got %v", wait)
	}

	stateAfter, err := rdb.HGetAll(ctx, bucketKey(name)).Result()
	if err != nil {
		t.Fatalf("HGETALL of the bucket failed: %v", err)
	}
	if !maps.Equal(stateBefore, stateAfter) {
		t.Fatalf("expected a rejected Reserve to leave the bucket state unchanged, got %v before and %v after", stateBefore, stateAfter)
	}

	// The rejected call took nothing, so the next token is still the first refill.
	wait, err = bucket.Reserve(ctx, 10*time.Second)
	if err != nil {
		t.Fatalf("expected Reserve with a maximum wait of 10s to succeed, got %v", err)
	}
	if wait <= 0 || wait > period {
		t.Fatalf("expected the reservation after the rejected one to wait between 0 and one period (%v), got %v", period, wait)
	}
}

func TestTokenBucketMaxWaitBelowMicrosecond(t *testing.T) {
	t.Parallel()
	const period = 2 * time.Second
	bucket, _, _ := newBucket(t, 1, period, 1)
	ctx := testContext(t, 30*time.Second)

	reserveNow(t, ctx, bucket)

	// Any maxWait > 0 is a limit, so a wait of about one period must be rejected.
	wait, err := bucket.Reserve(ctx, 500*time.Nanosecond)
	if !errors.Is(err, core.ErrMaxSleepExceeded) {
		t.Fatalf("expected Reserve with a maximum wait of 500ns on an empty bucket to fail with ErrMaxSleepExceeded, got wait %v and error %v", wait, err)
	}
}

func TestTokenBucketWaitCanceled(t *testing.T) {
	t.Parallel()
	const period = 10 * time.Second
	bucket, _, _ := newBucket(t, 1, period, 1)
	ctx := testContext(t, 30*time.Second)

	if err := bucket.Wait(ctx, 0); err != nil {
		t.Fatalf("expected Wait on a fresh bucket to return at once, got %v", err)
	}

	waitCtx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := bucket.Wait(waitCtx, 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("expected Wait to return context.DeadlineExceeded when its context ends, got %v", err)
	}
	if elapsed := time.Since(start); elapsed > period/2 {
		t.Fatalf("expected Wait to return soon after its context ended at 200ms, got %v", elapsed)
	}

	// The canceled Wait keeps its token, so the next one comes a period later.
	if wait := reserveNow(t, ctx, bucket); wait <= period {
		t.Fatalf("expected the reservation after a canceled Wait to wait more than one period (%v), got %v", period, wait)
	}
}

func TestTokenBucketScriptFlush(t *testing.T) {
	t.Parallel()
	bucket, rdb, _ := newBucket(t, 2, time.Second, 1)
	ctx := testContext(t, 30*time.Second)

	if wait := reserveNow(t, ctx, bucket); wait != 0 {
		t.Fatalf("expected the first reservation to wait 0, got %v", wait)
	}
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatalf("SCRIPT FLUSH failed: %v", err)
	}
	wait, err := bucket.Reserve(ctx, 0)
	if err != nil {
		t.Fatalf("expected Reserve after SCRIPT FLUSH to load the script again, got %v", err)
	}
	if wait != 0 {
		t.Fatalf("expected the second reservation of a bucket of capacity 2 to wait 0, got %v", wait)
	}
}

func TestTokenBucketKeyExpires(t *testing.T) {
	t.Parallel()
	const capacity = 2
	const period = 300 * time.Millisecond
	bucket, rdb, name := newBucket(t, capacity, period, 1)
	ctx := testContext(t, 30*time.Second)

	for range capacity + 1 {
		reserveNow(t, ctx, bucket)
	}

	// One token is reserved ahead, so the bucket is full again after three refills.
	ttl, err := rdb.PTTL(ctx, bucketKey(name)).Result()
	if err != nil {
		t.Fatalf("PTTL of the bucket failed: %v", err)
	}
	if ttl <= 0 || ttl > 3*period+2*time.Millisecond {
		t.Fatalf("expected the bucket key to expire within three periods (%v), got PTTL %v", 3*period, ttl)
	}

	waitFor(t, 3*period+3*time.Second, func() (bool, string) {
		keys := limiterKeys(t, rdb, "tb", name)
		return len(keys) == 0, "expected no key of the idle bucket to remain, got " + strings.Join(keys, ", ")
	})

	for i := range capacity {
		if wait := reserveNow(t, ctx, bucket); wait != 0 {
			t.Fatalf("expected reservation %d of a bucket whose key expired to wait 0, got %v", i+1, wait)
		}
	}
}

func TestTokenBucketWrongType(t *testing.T) {
	t.Parallel()
	bucket, rdb, name := newBucket(t, 1, time.Second, 1)
	ctx := testContext(t, 30*time.Second)

	if err := rdb.Set(ctx, bucketKey(name), "not a hash", time.Minute).Err(); err != nil {
		t.Fatalf("SET of the bucket key failed: %v", err)
	}
	_, err := bucket.Reserve(ctx, 0)
	requireRedisError(t, err, "Reserve on a bucket key that holds a string")
	if !strings.Contains(err.Error(), "WRONGTYPE") {
		t.Fatalf("expected the error to contain the WRONGTYPE reply, got %v", err)
	}
}

func TestTokenBucketClosedPort(t *testing.T) {
	t.Parallel()
	bucket, err := core.NewTokenBucket(closedPortClient(t), core.TokenBucketConfig{
		Name:         uniqueName(t),
		Capacity:     1,
		RefillPeriod: time.Second,
		RefillAmount: 1,
	})
	if err != nil {
		t.Fatalf("NewTokenBucket failed: %v", err)
	}
	_, err = bucket.Reserve(testContext(t, 30*time.Second), 0)
	requireRedisError(t, err, "Reserve on a closed port")
}

func TestTokenBucketInvalidConfig(t *testing.T) {
	t.Parallel()
	valid := core.TokenBucketConfig{Name: "x", Capacity: 1, RefillPeriod: time.Second, RefillAmount: 1}
	cases := []struct {
		name   string
		change func(*core.TokenBucketConfig)
	}{
		{"ZeroCapacity", func(c *core.TokenBucketConfig) { c.Capacity = 0 }},
		{"NegativeCapacity", func(c *core.TokenBucketConfig) { c.Capacity = -1 }},
		{"ZeroRefillAmount", func(c *core.TokenBucketConfig) { c.RefillAmount = 0 }},
		{"ZeroRefillPeriod", func(c *core.TokenBucketConfig) { c.RefillPeriod = 0 }},
		{"SubMicrosecondRefillPeriod", func(c *core.TokenBucketConfig) { c.RefillPeriod = 999 * time.Nanosecond }},
		{"RefillPeriodAboveMax", func(c *core.TokenBucketConfig) { c.RefillPeriod = core.MaxDuration + time.Microsecond }},
	}
	rdb := closedPortClient(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := valid
			tc.change(&cfg)
			_, err := core.NewTokenBucket(rdb, cfg)
			if !errors.Is(err, core.ErrInvalidArgument) {
				t.Fatalf("expected NewTokenBucket(%+v) to fail with ErrInvalidArgument, got %v", cfg, err)
			}
		})
	}
	if _, err := core.NewTokenBucket(rdb, valid); err != nil {
		t.Fatalf("expected NewTokenBucket(%+v) to succeed, got %v", valid, err)
	}
}
