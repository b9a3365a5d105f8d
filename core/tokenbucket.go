package core

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// TokenBucketConfig describes a token bucket. All processes that share a bucket should use the
// same values; each call is computed with the values of its caller.
type TokenBucketConfig struct {
	Name         string
	Capacity     int64         // tokens the bucket holds when full; it starts full
	RefillPeriod time.Duration // time between two refills, from 1µs to MaxDuration, rounded up to whole µs
	RefillAmount int64         // tokens added per refill, never above Capacity
}

// TokenBucket limits how many acquisitions happen per period, across every process that uses the
// same name on the same Redis. The schedule lives in one Redis hash and is computed on the Redis
// server clock, so clients with skewed clocks share one correct limit.
type TokenBucket struct {
	rdb    redis.Scripter
	cfg    TokenBucketConfig
	keys   []string
	period string // RefillPeriod in µs, as the script takes it
}

// NewTokenBucket returns a token bucket on rdb, or an error wrapping ErrInvalidArgument when
// cfg cannot work. It does not contact Redis.
func NewTokenBucket(rdb redis.Scripter, cfg TokenBucketConfig) (*TokenBucket, error) {
	switch {
	case cfg.Capacity < 1:
		return nil, invalidArgument("capacity must be at least 1, got %d", cfg.Capacity)
	case cfg.RefillAmount < 1:
		return nil, invalidArgument("refill amount must be at least 1, got %d", cfg.RefillAmount)
	case cfg.RefillPeriod < time.Microsecond:
		return nil, invalidArgument("refill period must be at least 1µs, got %v", cfg.RefillPeriod)
	case cfg.RefillPeriod > MaxDuration:
		return nil, invalidArgument("refill period must be at most %v, got %v", MaxDuration, cfg.RefillPeriod)
	}
	return &TokenBucket{
		rdb:    rdb,
		cfg:    cfg,
		keys:   []string{keyBase("tb", cfg.Name) + "state"},
		period: strconv.FormatInt(ceilMicroseconds(cfg.RefillPeriod), 10),
	}, nil
}

// Reserve takes one token and returns how long the caller must wait until that token exists:
// zero when one was available. When maxWait > 0 and the wait would exceed it, Reserve returns an
// error wrapping ErrMaxSleepExceeded and takes nothing. Callers are served in the order in which
// their Reserve reached Redis. One script call, one round trip.
func (b *TokenBucket) Reserve(ctx context.Context, maxWait time.Duration) (time.Duration, error) {
	const op = "token bucket acquire"
	maxWait = min(max(maxWait, 0), MaxDuration)

	reply, err := runScript(ctx, b.rdb, op, tokenBucketScript, b.keys,
		b.cfg.Capacity, b.period, b.cfg.RefillAmount, ceilMicroseconds(maxWait))
	if err != nil {
		return 0, err
	}
	granted, err := replyInt(op, reply, 0)
	if err != nil {
		return 0, err
	}
	waitMicros, err := replyInt(op, reply, 1)
	if err != nil {
		return 0, err
	}

	wait := time.Duration(waitMicros) * time.Microsecond
	if granted != 1 {
		return 0, fmt.Errorf("%w: the next token would take %v, more than the maximum of %v", ErrMaxSleepExceeded, wait, maxWait)
	}
	return wait, nil
}

// Wait takes one token as Reserve does, then sleeps until the token exists or ctx is done. The
// token stays taken when ctx ends the sleep.
func (b *TokenBucket) Wait(ctx context.Context, maxWait time.Duration) error {
	wait, err := b.Reserve(ctx, maxWait)
	if err != nil || wait <= 0 {
		return err
	}

	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ceilMicroseconds rounds d up to whole µs, the unit of the script: rounding down would turn a
// short maximum wait into 0 (no limit) and a refill period into a faster rate.
func ceilMicroseconds(d time.Duration) int64 {
	return int64((d + time.Microsecond - 1) / time.Microsecond)
}
