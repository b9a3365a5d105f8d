package tests_go

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/self-limiters/self-limiters/core"
)

// The benchmarks measure one caller that waits for each call before the next, on the server of
// TestMain (SL_REDIS_URL or a private redis-server). BenchmarkPing and BenchmarkEvalSha are the
// floor that a limiter call cannot beat: one round trip, and one round trip through the Lua
// engine. bench.py runs them with -run '^$' -bench . and reads their ns/op.

func BenchmarkPing(b *testing.B) {
	rdb := newClient(b)
	ctx := context.Background()
	if err := rdb.Ping(ctx).Err(); err != nil {
		b.Fatalf("PING failed: %v", err)
	}

	b.ResetTimer()
	for range b.N {
		if err := rdb.Ping(ctx).Err(); err != nil {
			b.Fatalf("PING failed: %v", err)
		}
	}
}

func BenchmarkEvalSha(b *testing.B) {
	rdb := newClient(b)
	ctx := context.Background()
	script := redis.NewScript("return 1")
	// Run loads the script once with EVAL after the first NOSCRIPT, so the loop times EVALSHA.
	if err := script.Run(ctx, rdb, nil).Err(); err != nil {
		b.Fatalf("loading the script failed: %v", err)
	}

	b.ResetTimer()
	for range b.N {
		if err := rdb.EvalSha(ctx, script.Hash(), nil).Err(); err != nil {
			b.Fatalf("EVALSHA failed: %v", err)
		}
	}
}

// BenchmarkSemaphoreAcquireRelease times one Acquire and one Release of a free slot: two script
// calls.
func BenchmarkSemaphoreAcquireRelease(b *testing.B) {
	rdb := newClient(b)
	sem := newSemaphore(b, rdb, uniqueName(b), 1, 30*time.Second)
	ctx := context.Background()

	b.ResetTimer()
	for range b.N {
		lease, err := sem.Acquire(ctx, 0)
		if err != nil {
			b.Fatalf("Acquire failed: %v", err)
		}
		if err := lease.Release(ctx); err != nil {
			b.Fatalf("Release failed: %v", err)
		}
	}
}

// BenchmarkTokenBucketReserve times Reserve on a bucket that never runs out: one script call.
func BenchmarkTokenBucketReserve(b *testing.B) {
	rdb := newClient(b)
	bucket, err := core.NewTokenBucket(rdb, core.TokenBucketConfig{
		Name:         uniqueName(b),
		Capacity:     1 << 40,
		RefillPeriod: time.Hour,
		RefillAmount: 1 << 40,
	})
	if err != nil {
		b.Fatalf("NewTokenBucket failed: %v", err)
	}
	ctx := context.Background()

	b.ResetTimer()
	for range b.N {
		wait, err := bucket.Reserve(ctx, 0)
		if err != nil {
			b.Fatalf("Reserve failed: %v", err)
		}
		if wait != 0 {
			b.Fatalf("expected no wait from a bucket of 2**40 tokens, got %v", wait)
		}
	}
}
