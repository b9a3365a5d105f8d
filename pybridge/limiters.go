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

// handle is one open limiter, shared by every Python object with the same settings. It is
// dropped when the last of them is collected, so an application that makes limiters for
// ever-new names does not accumulate them.
type handle struct {
	key     any // semaphoreKey or bucketKey
	limiter any // *core.Semaphore or *core.TokenBucket
	opens   int // Python objects that hold the handle
}

var (
	limitersMu   sync.Mutex
	clientsByKey = make(map[clientKey]*clients)
	handlesByKey = make(map[any]int64)
	handles      = make(map[int64]*handle)
	nextHandle   int64
)

// OpenSemaphore returns the handle of the semaphore with these settings, creating it on first
// use; later calls with the same settings share it, and its connections. It does not contact
// Redis. Each successful call must be matched by one CloseLimiter. On failure it returns the
// negated id of an error (see TakeError).
func OpenSemaphore(redisURL, name string, capacity int64, expirySeconds float64, poolSize int64) int64 {
	expiry, err := seconds("expiry", expirySeconds)
	if err != nil {
		return -storeError(err)
	}
	key := semaphoreKey{clientKey{redisURL, poolSize}, name, capacity, expiry}
	return openHandle(key, func(c *clients) (any, error) {
		return core.NewSemaphore(c.scripts, core.SemaphoreConfig{
			Name: name, Capacity: capacity, Expiry: expiry, WakeClient: c.wake,
		})
	})
}

// OpenTokenBucket returns the handle of the token bucket with these settings, as OpenSemaphore
// does for semaphores.
func OpenTokenBucket(redisURL, name string, capacity int64, refillSeconds float64, refillAmount, poolSize int64) int64 {
	period, err := seconds("refill_frequency", refillSeconds)
	if err != nil {
		return -storeError(err)
	}
	key := bucketKey{clientKey{redisURL, poolSize}, name, capacity, period, refillAmount}
	return openHandle(key, func(c *clients) (any, error) {
		return core.NewTokenBucket(c.scripts, core.TokenBucketConfig{
			Name: name, Capacity: capacity, RefillPeriod: period, RefillAmount: refillAmount,
		})
	})
}

// openHandle returns the handle of key, creating its limiter with create on first use.
func openHandle(key any, create func(*clients) (any, error)) int64 {
	limitersMu.Lock()
	defer limitersMu.Unlock()

	if id, ok := handlesByKey[key]; ok {
		handles[id].opens++
		return id
	}
	var client clientKey
	switch k := key.(type) {
	case semaphoreKey:
		client = k.client
	case bucketKey:
		client = k.client
	}
	c, err := clientsFor(client)
	if err != nil {
		return -storeError(err)
	}
	limiter, err := create(c)
	if err != nil {
		return -storeError(err)
	}
	nextHandle++
	handlesByKey[key] = nextHandle
	handles[nextHandle] = &handle{key: key, limiter: limiter, opens: 1}
	return nextHandle
}

// CloseLimiter drops one open of a handle; the last one forgets the limiter. Slots it still holds
// stay held and renewed until they are released, since their requests refer to the limiter
// itself. Unknown handles are ignored.
func CloseLimiter(id int64) {
	limitersMu.Lock()
	defer limitersMu.Unlock()

	h, ok := handles[id]
	if !ok {
		return
	}
	h.opens--
	if h.opens == 0 {
		delete(handles, id)
		delete(handlesByKey, h.key)
	}
}

// OpenLimiters returns how many limiters with distinct settings are open, for tests and
// diagnostics.
func OpenLimiters() int64 {
	limitersMu.Lock()
	defer limitersMu.Unlock()
	return int64(len(handles))
}

// limiterOf returns the limiter of an open handle, or nil.
func limiterOf(id int64) any {
	limitersMu.Lock()
	defer limitersMu.Unlock()
	if h, ok := handles[id]; ok {
		return h.limiter
	}
	return nil
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
