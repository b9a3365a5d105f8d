// Package pybridge is the flat API that gopy binds for the Python package: functions over
// handles, numbers and strings.
//
// Waiting never blocks a Python thread. A call such as SemaphoreAcquire starts the work in a
// goroutine and returns a request id at once; the outcome arrives later as a 16-byte record
// (request id, value: two little-endian int64) written to a pipe that the caller's event loop
// watches, one pipe per loop (see OpenQueue). A negative value is the negated id of an error
// to fetch with TakeError.
package pybridge

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/self-limiters/self-limiters/core"
)

// Values of the records that answer SemaphoreRelease.
const (
	Released         = 0 // the slot was given back
	LeaseLost        = 1 // the lease had expired before the release; another holder may have the slot
	NothingToRelease = 2 // the request held no slot: it failed, was cancelled or released already
)

// releaseTimeout bounds a release, which must not wait for a connection forever.
const releaseTimeout = 30 * time.Second

// releasesInFlight counts the releases running in goroutines, for WaitForReleases.
var releasesInFlight sync.WaitGroup

type queue struct {
	mu   sync.Mutex
	file *os.File
}

// request is one acquire in flight or one slot held. Its fields are guarded by requestsMu.
type request struct {
	queue     *queue
	cancel    context.CancelFunc
	abandoned bool        // Cancel came before the outcome, which must then not be reported
	lease     *core.Lease // the slot, once the acquire succeeded and was reported
}

var (
	requestsMu    sync.Mutex
	requests      = make(map[int64]*request)
	queues        = make(map[int64]*queue)
	nextRequestID int64
	nextQueueID   int64
)

// OpenQueue takes over fd, the non-blocking write end of a pipe, and returns the id of a queue
// that reports outcomes on it. The pipe belongs to this package from then on: CloseQueue closes it.
func OpenQueue(fd int64) int64 {
	file := os.NewFile(uintptr(fd), "self-limiters completions")
	if file == nil {
		return -storeError(fmt.Errorf("invalid file descriptor %d", fd))
	}

	requestsMu.Lock()
	defer requestsMu.Unlock()
	nextQueueID++
	queues[nextQueueID] = &queue{file: file}
	return nextQueueID
}

// CloseQueue closes the pipe of a queue whose event loop is gone. Outcomes that can no longer be
// reported are undone: a slot acquired for nobody is given back.
func CloseQueue(id int64) {
	requestsMu.Lock()
	q := queues[id]
	delete(queues, id)
	requestsMu.Unlock()

	if q != nil {
		q.mu.Lock()
		_ = q.file.Close()
		q.file = nil
		q.mu.Unlock()
	}
}

// write reports value for request id, and returns false when the queue was closed. Writes of
// 16 bytes to a pipe are atomic, so records of concurrent goroutines never interleave; when the
// pipe is full, the goroutine waits in Go's poller and no thread is blocked.
func (q *queue) write(id, value int64) bool {
	var record [16]byte
	binary.LittleEndian.PutUint64(record[0:], uint64(id))
	binary.LittleEndian.PutUint64(record[8:], uint64(value))

	q.mu.Lock()
	file := q.file
	q.mu.Unlock()
	if file == nil {
		return false
	}
	_, err := file.Write(record[:])
	return err == nil
}

// startRequest registers a request reported on queue queueID and returns its id with a context
// that Cancel ends, or the negated id of an error.
func startRequest(queueID int64, maxSleepSeconds float64) (int64, *request, context.Context, error) {
	if maxSleepSeconds < 0 || maxSleepSeconds != maxSleepSeconds {
		return 0, nil, nil, fmt.Errorf("%w: max_sleep must be 0 or more seconds, got %v", core.ErrInvalidArgument, maxSleepSeconds)
	}
	ctx, cancel := context.WithCancel(context.Background())

	requestsMu.Lock()
	defer requestsMu.Unlock()
	q, ok := queues[queueID]
	if !ok {
		cancel()
		return 0, nil, nil, fmt.Errorf("self_limiters bridge: unknown queue %d", queueID)
	}
	nextRequestID++
	req := &request{queue: q, cancel: cancel}
	requests[nextRequestID] = req
	return nextRequestID, req, ctx, nil
}

// finish reports the outcome of request id: err when it is not nil, else value. A lease nobody
// can receive any more is released, and the error of an abandoned request is not stored, since
// nobody would take it.
func finish(id int64, req *request, lease *core.Lease, value int64, err error) {
	requestsMu.Lock()
	abandoned := req.abandoned
	if abandoned || lease == nil {
		delete(requests, id)
	} else {
		req.lease = lease
	}
	requestsMu.Unlock()
	req.cancel()

	if abandoned {
		releaseInBackground(lease)
		return
	}
	if err != nil {
		value = -storeError(err)
	}
	if !req.queue.write(id, value) && lease != nil {
		requestsMu.Lock()
		_, stillHeld := requests[id]
		delete(requests, id)
		requestsMu.Unlock()
		if stillHeld {
			releaseInBackground(lease)
		}
	}
}

// durationFromSeconds converts a non-negative number of seconds, capped at core.MaxDuration so
// that no value overflows a time.Duration.
func durationFromSeconds(value float64) time.Duration {
	return time.Duration(min(value, core.MaxDuration.Seconds()) * float64(time.Second))
}

func releaseInBackground(lease *core.Lease) {
	if lease == nil {
		return
	}
	releasesInFlight.Add(1)
	go func() {
		defer releasesInFlight.Done()
		ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
		defer cancel()
		_ = lease.Release(ctx) // on failure the lease is no longer renewed and expires
	}()
}

// WaitForReleases waits until every release started so far has reached Redis or failed, for at
// most timeoutSeconds, and reports whether they all did. The Python package calls it at exit,
// because a release does not keep its caller waiting and would otherwise die with the process,
// leaving the slot to expire.
func WaitForReleases(timeoutSeconds float64) bool {
	done := make(chan struct{})
	go func() {
		releasesInFlight.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(durationFromSeconds(max(timeoutSeconds, 0))):
		return false
	}
}

// SemaphoreAcquire starts waiting for a slot of semaphore handle sem and returns the request id,
// which also names the slot for SemaphoreRelease. The outcome record has value 0 when the slot
// is held, or an error: MaxSleepExceededError after maxSleepSeconds (0 waits without limit),
// RedisError, ValueError.
func SemaphoreAcquire(sem, queueID int64, maxSleepSeconds float64) int64 {
	s, _ := limiterOf(sem).(*core.Semaphore)
	if s == nil {
		return -storeError(fmt.Errorf("self_limiters bridge: unknown semaphore handle %d", sem))
	}
	id, req, ctx, err := startRequest(queueID, maxSleepSeconds)
	if err != nil {
		return -storeError(err)
	}

	// No goroutine waits: the semaphore calls back once, and the outcome is written from a
	// goroutine of its own, since a full pipe must not hold up the semaphore's wake-ups.
	s.AcquireFunc(ctx, durationFromSeconds(maxSleepSeconds), func(lease *core.Lease, err error) {
		go finish(id, req, lease, 0, err)
	})
	return id
}

// SemaphoreRelease gives back the slot that acquire request id holds and returns the id of a
// new request, whose record has the value Released, LeaseLost or NothingToRelease, or an error.
func SemaphoreRelease(id, queueID int64) int64 {
	requestsMu.Lock()
	var lease *core.Lease
	if req, ok := requests[id]; ok && req.lease != nil {
		lease = req.lease
		delete(requests, id)
	}
	requestsMu.Unlock()

	releaseID, req, _, err := startRequest(queueID, 0)
	if err != nil {
		releaseInBackground(lease)
		return -storeError(err)
	}
	releasesInFlight.Add(1)
	go func() {
		defer releasesInFlight.Done()
		value := int64(NothingToRelease)
		var err error
		if lease != nil {
			ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
			err = lease.Release(ctx)
			cancel()
			value = Released
			if errors.Is(err, core.ErrLeaseLost) {
				value, err = LeaseLost, nil
			}
		}
		finish(releaseID, req, nil, value, err)
	}()
	return releaseID
}

// TokenBucketAcquire takes a token of bucket handle bucket and returns the request id. The
// outcome record has the moment at which the token exists, in µs of CLOCK_MONOTONIC (Python's
// time.monotonic), or 0 when it exists already. It has an error instead when the request fails:
// MaxSleepExceededError when the wait would exceed maxSleepSeconds (0 for no limit), in which case
// nothing is taken, or RedisError.
//
// The moment is the reply's arrival plus the wait that the script computed, so the time that the
// record and the task that awaits it spend queued on a busy event loop is not added to the wait.
func TokenBucketAcquire(bucket, queueID int64, maxSleepSeconds float64) int64 {
	b, _ := limiterOf(bucket).(*core.TokenBucket)
	if b == nil {
		return -storeError(fmt.Errorf("self_limiters bridge: unknown token bucket handle %d", bucket))
	}
	id, req, ctx, err := startRequest(queueID, maxSleepSeconds)
	if err != nil {
		return -storeError(err)
	}

	go func() {
		wait, err := b.Reserve(ctx, durationFromSeconds(maxSleepSeconds))
		var usableAt int64
		if err == nil && wait > 0 {
			usableAt = monotonicMicros() + wait.Microseconds()
		}
		finish(id, req, nil, usableAt, err)
	}()
	return id
}

// Cancel abandons request id: an acquire still waiting stops and holds nothing, and a slot
// already acquired but not yet taken by Python is given back. Unknown ids are ignored, so
// Cancel is safe after the request finished.
func Cancel(id int64) {
	requestsMu.Lock()
	req, ok := requests[id]
	if !ok {
		requestsMu.Unlock()
		return
	}
	lease := req.lease
	if lease != nil {
		delete(requests, id)
	} else {
		req.abandoned = true
	}
	requestsMu.Unlock()

	req.cancel()
	releaseInBackground(lease)
}
