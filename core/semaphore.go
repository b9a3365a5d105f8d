package core

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Blocker is the one blocking command a Semaphore needs: BLPOP on its wake-up list. Every
// go-redis client (single node, Sentinel, Cluster) implements it.
type Blocker interface {
	BLPop(ctx context.Context, timeout time.Duration, keys ...string) *redis.StringSliceCmd
}

// SemaphoreConfig describes a semaphore. All processes that share a semaphore should use the
// same values.
type SemaphoreConfig struct {
	Name     string
	Capacity int64         // holders allowed at once, from 1 to MaxCapacity
	Expiry   time.Duration // lease length and idle lifetime of the keys, from MinExpiry to MaxDuration

	// WakeClient, when set, serves the BLPOP on which waiters of this process learn that another
	// process admitted them, so waiting never holds a connection of the command client's pool.
	// It defaults to the command client.
	WakeClient Blocker
}

const (
	// MaxCapacity keeps counts exact in the float64 numbers of Redis's Lua.
	MaxCapacity = 1 << 53
	// MinExpiry leaves room for renewals, which run every Expiry/3.
	MinExpiry = 10 * time.Millisecond
	// MaxDuration bounds every duration (expiry, refill period, maximum wait), which keeps the
	// schedules in µs exact in the float64 numbers of Redis's Lua.
	MaxDuration = 100 * 365 * 24 * time.Hour

	// wakeBlockTimeout bounds one BLPOP of the wake-up loop; the loop ends at the first timeout
	// after the last waiter of this process left.
	wakeBlockTimeout = time.Second
	// cleanupTimeout bounds the background scripts that give back a slot or a place in the queue.
	cleanupTimeout = 10 * time.Second
	// retryDelay is the pause after a failed check-in or wake-up read before the next try.
	retryDelay = 200 * time.Millisecond
)

// Semaphore allows at most Capacity holders at once among all processes that use the same name
// on the same Redis, and admits waiters first come, first served.
//
// Slots are leases that expire after Expiry unless renewed. A Semaphore renews the leases of its
// holders every Expiry/3 in one script call, however long they hold, so a holder that crashes
// loses its slot about Expiry after its last renewal, while a live one keeps it. Waiters that wait
// in Redis check in at the same period, and also when the earliest lease is due, so the slot of a
// crashed holder is reclaimed even if nobody releases. Waiting costs no polling: a release admits
// the next waiters and wakes them, through a wake-up list per process and semaphore.
//
// A Semaphore is safe for concurrent use. Each value is one participant with an owner id of its
// own, so a process should keep one value per name and share it between callers.
type Semaphore struct {
	rdb     redis.Scripter
	wake    Blocker
	cfg     SemaphoreConfig
	keys    []string // holders, waiters, ticket counter, lost leases
	owner   string
	args    []any // ARGV[1..4] of every semaphore script
	wakeKey string

	mu          sync.Mutex
	seq         uint64
	waiters     map[string]*waiter
	holders     map[string]*Lease
	keeperOn    bool
	wakerOn     bool
	nextCheckIn time.Time
	kick        chan struct{} // wakes the keeper when nextCheckIn moved earlier
}

// waiter is a token that waits for a slot. Exactly one outcome ends it: a slot (wakeUp) or an
// error (giveUp). Its fields are guarded by Semaphore.mu.
type waiter struct {
	ctx       context.Context
	done      func(*Lease, error)
	timer     *time.Timer // ends the wait at maxWait; nil without a limit
	stopCtx   func() bool // stops the context.AfterFunc that ends the wait with ctx
	enqueuing bool        // an acquire script for the token is in flight
	ended     bool
	gaveUp    bool // ended by an error, so the token's slot or place must be given back
}

// Lease is one held slot of a Semaphore.
type Lease struct {
	sem      *Semaphore
	token    string
	lost     atomic.Bool // set by a check-in that found the lease expired
	released atomic.Bool
}

// NewSemaphore returns a semaphore on rdb, or an error wrapping ErrInvalidArgument when cfg
// cannot work. It does not contact Redis.
func NewSemaphore(rdb redis.Scripter, cfg SemaphoreConfig) (*Semaphore, error) {
	switch {
	case cfg.Capacity < 1 || cfg.Capacity > MaxCapacity:
		return nil, invalidArgument("capacity must be from 1 to %d, got %d", int64(MaxCapacity), cfg.Capacity)
	case cfg.Expiry < MinExpiry || cfg.Expiry > MaxDuration:
		return nil, invalidArgument("expiry must be from %v to %v, got %v", MinExpiry, MaxDuration, cfg.Expiry)
	}
	wake := cfg.WakeClient
	if wake == nil {
		blocker, ok := rdb.(Blocker)
		if !ok {
			return nil, invalidArgument("the client cannot run BLPOP and no WakeClient was given")
		}
		wake = blocker
	}

	var id [8]byte
	_, _ = rand.Read(id[:]) // crypto/rand.Read never returns an error since Go 1.24
	owner := hex.EncodeToString(id[:])
	base := keyBase("sem", cfg.Name)
	return &Semaphore{
		rdb:     rdb,
		wake:    wake,
		cfg:     cfg,
		keys:    []string{base + "holders", base + "waiters", base + "tickets", base + "lost"},
		owner:   owner,
		args:    []any{base, cfg.Capacity, cfg.Expiry.Milliseconds(), owner},
		wakeKey: base + "wake:" + owner,
		waiters: make(map[string]*waiter),
		holders: make(map[string]*Lease),
		kick:    make(chan struct{}, 1),
	}, nil
}

// Acquire waits for a slot and returns its lease. When maxWait > 0 and no slot was granted
// within maxWait of the call, it returns an error wrapping ErrMaxSleepExceeded; the limit applies
// to waiting in the queue only, so a free slot is granted even when maxWait is shorter than one
// round trip. Acquire returns ctx.Err() when ctx ends first, and a *RedisError when Redis fails.
// After any error the caller holds nothing: a slot granted at the last moment goes to the next
// waiter. Acquire does not contact Redis when ctx is already done.
func (s *Semaphore) Acquire(ctx context.Context, maxWait time.Duration) (*Lease, error) {
	type result struct {
		lease *Lease
		err   error
	}
	done := make(chan result, 1)
	s.AcquireFunc(ctx, maxWait, func(lease *Lease, err error) { done <- result{lease, err} })
	r := <-done
	return r.lease, r.err
}

// AcquireFunc is Acquire without a waiting goroutine: it returns at once and calls f exactly once,
// from another goroutine, with the lease or the error that Acquire would return. A waiter then
// costs a few hundred bytes instead of a goroutine, so that 10,000 waiters stay small. f must not
// block for long, since it may run on the goroutine that reads wake-ups.
func (s *Semaphore) AcquireFunc(ctx context.Context, maxWait time.Duration, f func(*Lease, error)) {
	if err := ctx.Err(); err != nil {
		go f(nil, err)
		return
	}
	start := time.Now()
	token, w := s.addWaiter(ctx, f)
	go s.enqueueWaiter(token, w, start, maxWait)
}

// addWaiter registers a new token before its acquire script runs, so that a wake-up arriving
// before the script's reply finds it.
func (s *Semaphore) addWaiter(ctx context.Context, f func(*Lease, error)) (string, *waiter) {
	s.mu.Lock()
	defer s.mu.Unlock()

	s.seq++
	token := s.owner + ":" + strconv.FormatUint(s.seq, 10)
	w := &waiter{ctx: ctx, done: f, enqueuing: true}
	s.waiters[token] = w
	w.stopCtx = context.AfterFunc(ctx, func() { s.giveUp(token, ctx.Err()) })
	return token, w
}

// enqueueWaiter runs the acquire script for a waiter and settles what the reply decides. The
// maximum wait starts counting once the script has answered, so a free slot is always granted.
// A waiter that gave up while the script was in flight gives back its slot or queue place only
// now, after the script, so that the release cannot reach Redis first.
func (s *Semaphore) enqueueWaiter(token string, w *waiter, start time.Time, maxWait time.Duration) {
	granted, err := s.enqueue(w.ctx, token)

	s.mu.Lock()
	w.enqueuing = false
	gaveUp := w.gaveUp
	if !w.ended && err == nil && !granted && maxWait > 0 && w.timer == nil {
		w.timer = time.AfterFunc(max(maxWait-time.Since(start), 0), func() {
			s.giveUp(token, fmt.Errorf("%w: no slot was granted within %v", ErrMaxSleepExceeded, maxWait))
		})
	}
	s.mu.Unlock()

	switch {
	case gaveUp:
		go s.releaseInBackground(token)
	case err != nil:
		s.giveUp(token, err)
	case granted:
		s.wakeUp(token)
	}
}

// giveUp ends the waiter of token with err, unless it has ended already, and gives back its
// queue place, or its slot if it was admitted at the same moment.
func (s *Semaphore) giveUp(token string, err error) {
	s.mu.Lock()
	w, ok := s.waiters[token]
	if !ok || w.ended {
		s.mu.Unlock()
		return
	}
	delete(s.waiters, token)
	w.end()
	w.gaveUp = true
	enqueuing := w.enqueuing
	s.mu.Unlock()

	if !enqueuing {
		go s.releaseInBackground(token)
	}
	w.done(nil, err)
}

// end marks the waiter ended and stops what would end it otherwise. The caller holds
// Semaphore.mu.
func (w *waiter) end() {
	w.ended = true
	w.stopCtx()
	if w.timer != nil {
		w.timer.Stop()
	}
}

// enqueue runs the acquire script for token and reports whether it holds a slot. When it waits,
// enqueue makes sure that wake-ups are read and that the process checks in.
func (s *Semaphore) enqueue(ctx context.Context, token string) (bool, error) {
	const op = "semaphore acquire"
	reply, err := runScript(ctx, s.rdb, op, semaphoreAcquireScript, s.keys, s.scriptArgs(token)...)
	if err != nil {
		return false, err
	}
	status, err := replyInt(op, reply, 0)
	if err != nil {
		return false, err
	}
	next, err := replyInt(op, reply, 1)
	if err != nil {
		return false, err
	}
	if err := s.wakeOwn(op, reply[2:]); err != nil {
		return false, err
	}

	if status == 1 {
		return true, nil
	}
	s.mu.Lock()
	if !s.wakerOn {
		s.wakerOn = true
		go s.readWakeUps()
	}
	s.mu.Unlock()
	s.scheduleCheckIn(next)
	return false, nil
}

func (s *Semaphore) releaseInBackground(token string) {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	// A failure leaves the token to expiry: a queued token is skipped once this process stops
	// checking in for it, and a slot expires after Expiry because nothing renews it.
	_, _ = s.release(ctx, token)
}

// release runs the release script for token and reports whether it held a slot.
func (s *Semaphore) release(ctx context.Context, token string) (bool, error) {
	const op = "semaphore release"
	reply, err := runScript(ctx, s.rdb, op, semaphoreReleaseScript, s.keys, s.scriptArgs(token)...)
	if err != nil {
		return false, err
	}
	released, err := replyInt(op, reply, 0)
	if err != nil {
		return false, err
	}
	if err := s.wakeOwn(op, reply[2:]); err != nil {
		return false, err
	}
	return released == 1, nil
}

// scriptArgs returns the ARGV of a script that takes one token.
func (s *Semaphore) scriptArgs(token string) []any {
	args := make([]any, 0, len(s.args)+1)
	return append(append(args, s.args...), token)
}

// wakeOwn wakes the tokens of this process that a script admitted.
func (s *Semaphore) wakeOwn(op string, tokens []any) error {
	for i := range tokens {
		token, err := replyString(op, tokens, i)
		if err != nil {
			return err
		}
		s.wakeUp(token)
	}
	return nil
}

// wakeUp hands the slot that Redis granted to token to its waiter. A token that holds already
// was woken twice (by a wake-up and a check-in) and is left alone. A token that nobody waits for
// any more belongs to a waiter that gave up while it was admitted, so its slot is given back.
func (s *Semaphore) wakeUp(token string) {
	s.mu.Lock()
	if w, ok := s.waiters[token]; ok && !w.ended {
		delete(s.waiters, token)
		w.end()
		lease := &Lease{sem: s, token: token}
		s.holders[token] = lease
		s.startKeeper()
		s.mu.Unlock()
		w.done(lease, nil)
		return
	}
	_, held := s.holders[token]
	s.mu.Unlock()
	if !held {
		go s.releaseInBackground(token)
	}
}

// requeue enqueues the waiter of token again, unless a script for it is in flight already.
func (s *Semaphore) requeue(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()

	if w, ok := s.waiters[token]; ok && !w.ended && !w.enqueuing {
		w.enqueuing = true
		go s.enqueueWaiter(token, w, time.Now(), 0)
	}
}

// readWakeUps pops the tokens that other processes admitted from this process's wake-up list,
// until no waiter is left. The BLPOP is never cancelled while in flight: an interrupted BLPOP
// whose reply was already sent would lose a token. Even then the waiter is not stuck, because
// the next check-in finds it admitted.
func (s *Semaphore) readWakeUps() {
	for {
		s.mu.Lock()
		if len(s.waiters) == 0 {
			s.wakerOn = false
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()

		reply, err := s.wake.BLPop(context.Background(), wakeBlockTimeout, s.wakeKey).Result()
		var replyErr redis.Error
		switch {
		case err == redis.Nil:
		case errors.As(err, &replyErr):
			// Redis refused the command (an ACL without BLPOP, for example): retrying cannot
			// help, and the waiters would never learn that another process admitted them.
			s.failWaiters(s.waitingTokens(), redisError("semaphore wake-up read", err))
			time.Sleep(retryDelay)
		case err != nil:
			// The connection may have been dropped, or Redis may be gone. A check-in tells
			// which: waiters go on if it succeeds and fail with its error otherwise.
			s.scheduleCheckIn(0)
			time.Sleep(retryDelay)
		case len(reply) == 2:
			s.wakeUp(reply[1])
		}
	}
}

// startKeeper starts the check-in loop unless it runs. The caller holds s.mu.
func (s *Semaphore) startKeeper() {
	if s.keeperOn {
		return
	}
	s.keeperOn = true
	s.nextCheckIn = time.Now().Add(s.cfg.Expiry / 3)
	go s.keep()
}

// scheduleCheckIn moves the next check-in earlier to just after the earliest lease deadline,
// given in ms from now (negative when nobody holds), and starts the check-in loop if needed.
func (s *Semaphore) scheduleCheckIn(nextDeadlineMillis int64) {
	s.mu.Lock()
	defer s.mu.Unlock()

	s.startKeeper()
	if nextDeadlineMillis < 0 {
		return
	}
	at := time.Now().Add(time.Duration(nextDeadlineMillis+1) * time.Millisecond)
	if at.Before(s.nextCheckIn) {
		s.nextCheckIn = at
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// keep renews the leases of this process and checks its waiters in, every Expiry/3 and when the
// earliest lease of any holder is due, until this process neither holds nor waits.
func (s *Semaphore) keep() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()

	for {
		s.mu.Lock()
		delay := time.Until(s.nextCheckIn)
		s.mu.Unlock()
		timer.Reset(delay)
		select {
		case <-timer.C:
		case <-s.kick:
			continue
		}

		s.mu.Lock()
		if len(s.holders) == 0 && len(s.waiters) == 0 {
			s.keeperOn = false
			s.mu.Unlock()
			return
		}
		holders := make([]string, 0, len(s.holders))
		for token := range s.holders {
			holders = append(holders, token)
		}
		waiters := make([]string, 0, len(s.waiters))
		for token := range s.waiters {
			waiters = append(waiters, token)
		}
		s.nextCheckIn = time.Now().Add(s.cfg.Expiry / 3)
		s.mu.Unlock()

		next, err := s.checkIn(holders, waiters)
		switch {
		case err != nil:
			// Holders keep running; their Release reports whether the lease survived.
			s.failWaiters(waiters, err)
			s.scheduleRetry()
		case len(waiters) > 0:
			s.scheduleCheckIn(next)
		}
	}
}

func (s *Semaphore) scheduleRetry() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if at := time.Now().Add(retryDelay); at.Before(s.nextCheckIn) {
		s.nextCheckIn = at
	}
}

// checkIn runs the renew script and acts on its reply; it returns the ms until the earliest lease
// deadline.
func (s *Semaphore) checkIn(holders, waiters []string) (int64, error) {
	const op = "semaphore renew"
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()

	args := make([]any, 0, len(s.args)+1+len(holders)+len(waiters))
	args = append(args, s.args...)
	args = append(args, len(holders))
	for _, token := range holders {
		args = append(args, token)
	}
	for _, token := range waiters {
		args = append(args, token)
	}
	reply, err := runScript(ctx, s.rdb, op, semaphoreRenewScript, s.keys, args...)
	if err != nil {
		return 0, err
	}
	next, err := replyInt(op, reply, 0)
	if err != nil {
		return 0, err
	}

	for i := 1; i+1 < len(reply); i += 2 {
		token, err := replyString(op, reply, i)
		if err != nil {
			return 0, err
		}
		code, err := replyInt(op, reply, i+1)
		if err != nil {
			return 0, err
		}
		switch code {
		case 0:
			s.markLost(token)
		case 1:
			s.wakeUp(token)
		case 2:
			s.requeue(token)
		}
	}
	return next, nil
}

// waitingTokens returns the tokens of the waiters of this process.
func (s *Semaphore) waitingTokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	tokens := make([]string, 0, len(s.waiters))
	for token := range s.waiters {
		tokens = append(tokens, token)
	}
	return tokens
}

// failWaiters ends the given waiters with err, because their state in Redis cannot be checked:
// every Redis failure reaches the caller instead of a wait of unknown length.
func (s *Semaphore) failWaiters(tokens []string, err error) {
	for _, token := range tokens {
		s.giveUp(token, err)
	}
}

// markLost stops renewing a lease that expired in Redis; its Release returns ErrLeaseLost.
func (s *Semaphore) markLost(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()

	if lease, ok := s.holders[token]; ok {
		lease.lost.Store(true)
		delete(s.holders, token)
	}
}

// Release gives the slot back and admits the next waiters. It returns ErrLeaseLost when the
// lease had already expired, in which case the slot is left to whoever holds it now, and a
// *RedisError when Redis fails, in which case the lease is no longer renewed and expires within
// Expiry. Calls after the first return nil and do nothing.
func (l *Lease) Release(ctx context.Context) error {
	if l.released.Swap(true) {
		return nil
	}
	s := l.sem
	s.mu.Lock()
	delete(s.holders, l.token)
	s.mu.Unlock()

	if l.lost.Load() {
		return ErrLeaseLost
	}
	released, err := s.release(ctx, l.token)
	if err != nil {
		return err
	}
	if !released {
		return ErrLeaseLost
	}
	return nil
}
