package pybridge

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/self-limiters/self-limiters/core"
)

// Timeouts used unless the URL sets them with dial_timeout, read_timeout or write_timeout.
const (
	defaultDialTimeout  = 5 * time.Second
	defaultReadTimeout  = 3 * time.Second
	defaultWriteTimeout = 3 * time.Second

	// wakePoolSize bounds the connections that wait for wake-ups: one per semaphore that has
	// waiters in this process.
	wakePoolSize = 1000
)

type clientKey struct {
	url      string
	poolSize int64
}

// clients are the go-redis clients of one URL and pool size: scripts runs the scripts through a
// gate as wide as the pool, and wake serves the blocking reads of wake-ups, so waiting never takes
// a connection from the scripts' pool.
type clients struct {
	scripts *gatedScripter
	wake    redis.UniversalClient
}

type semaphoreKey struct {
	client   clientKey
	name     string
	capacity int64
	expiry   time.Duration
}

type bucketKey struct {
	client       clientKey
	name         string
	capacity     int64
	refillPeriod time.Duration
	refillAmount int64
}

var (
	limitersMu       sync.Mutex
	clientsByKey     = make(map[clientKey]*clients)
	semaphoreHandles = make(map[semaphoreKey]int64)
	bucketHandles    = make(map[bucketKey]int64)
	semaphores       = make(map[int64]*core.Semaphore)
	buckets          = make(map[int64]*core.TokenBucket)
	nextHandle       int64
)

// OpenSemaphore returns the handle of the semaphore with these settings, creating it on first
// use; later calls with the same settings share it, and its connections. It does not contact
// Redis. On failure it returns the negated id of an error (see TakeError).
func OpenSemaphore(redisURL, name string, capacity int64, expirySeconds float64, poolSize int64) int64 {
	expiry, err := seconds("expiry", expirySeconds)
	if err != nil {
		return -storeError(err)
	}
	key := semaphoreKey{clientKey{redisURL, poolSize}, name, capacity, expiry}

	limitersMu.Lock()
	defer limitersMu.Unlock()
	if handle, ok := semaphoreHandles[key]; ok {
		return handle
	}
	c, err := clientsFor(key.client)
	if err != nil {
		return -storeError(err)
	}
	sem, err := core.NewSemaphore(c.scripts, core.SemaphoreConfig{
		Name: name, Capacity: capacity, Expiry: expiry, WakeClient: c.wake,
	})
	if err != nil {
		return -storeError(err)
	}
	nextHandle++
	semaphoreHandles[key] = nextHandle
	semaphores[nextHandle] = sem
	return nextHandle
}

// OpenTokenBucket returns the handle of the token bucket with these settings, as OpenSemaphore
// does for semaphores.
func OpenTokenBucket(redisURL, name string, capacity int64, refillSeconds float64, refillAmount, poolSize int64) int64 {
	period, err := seconds("refill_frequency", refillSeconds)
	if err != nil {
		return -storeError(err)
	}
	key := bucketKey{clientKey{redisURL, poolSize}, name, capacity, period, refillAmount}

	limitersMu.Lock()
	defer limitersMu.Unlock()
	if handle, ok := bucketHandles[key]; ok {
		return handle
	}
	c, err := clientsFor(key.client)
	if err != nil {
		return -storeError(err)
	}
	bucket, err := core.NewTokenBucket(c.scripts, core.TokenBucketConfig{
		Name: name, Capacity: capacity, RefillPeriod: period, RefillAmount: refillAmount,
	})
	if err != nil {
		return -storeError(err)
	}
	nextHandle++
	bucketHandles[key] = nextHandle
	buckets[nextHandle] = bucket
	return nextHandle
}

// seconds converts a duration in seconds from Python, rejecting values that no time.Duration
// can hold.
func seconds(name string, value float64) (time.Duration, error) {
	if math.IsNaN(value) || value < 0 || value > core.MaxDuration.Seconds() {
		return 0, fmt.Errorf("%w: %s must be from 0 to %.0f seconds, got %v", core.ErrInvalidArgument, name, core.MaxDuration.Seconds(), value)
	}
	return time.Duration(value * float64(time.Second)), nil
}

// clientsFor returns the clients of key, creating them on first use. The caller holds limitersMu.
func clientsFor(key clientKey) (*clients, error) {
	if c, ok := clientsByKey[key]; ok {
		return c, nil
	}
	if key.poolSize < 1 {
		return nil, fmt.Errorf("%w: connection_pool_size must be at least 1, got %d", core.ErrInvalidArgument, key.poolSize)
	}
	d, err := parseURL(key.url)
	if err != nil {
		return nil, err
	}
	c := &clients{
		scripts: newGatedScripter(d.newClient(int(key.poolSize)), key.poolSize),
		wake:    d.newClient(wakePoolSize),
	}
	clientsByKey[key] = c
	return c, nil
}
