package core

import (
	"errors"
	"fmt"
)

// ErrMaxSleepExceeded is returned when a caller would have to wait longer than its maximum.
// The caller then holds nothing: no slot and no token.
var ErrMaxSleepExceeded = errors.New("max sleep exceeded")

// ErrLeaseLost is returned by Lease.Release when the lease had expired before the release,
// because renewals did not reach Redis in time (for example, the process was stopped or Redis
// was unreachable for longer than the expiry). The slot may already belong to another holder,
// and the release leaves it alone.
var ErrLeaseLost = errors.New("lease lost: the slot had already expired and may belong to another holder")

// ErrInvalidArgument is returned by constructors for configuration values that cannot work.
var ErrInvalidArgument = errors.New("invalid argument")

// ErrRedis matches every RedisError with errors.Is.
var ErrRedis = errors.New("redis error")

// RedisError reports a failed Redis call: a refused or dropped connection, a timeout, or an
// error reply such as WRONGTYPE.
type RedisError struct {
	Op  string // what the limiter was doing, e.g. "semaphore acquire"
	Err error
}

func (e *RedisError) Error() string { return e.Op + ": " + e.Err.Error() }

func (e *RedisError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrRedis) true for every RedisError.
func (e *RedisError) Is(target error) bool { return target == ErrRedis }

func redisError(op string, err error) error {
	return &RedisError{Op: op, Err: err}
}

func invalidArgument(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidArgument, fmt.Sprintf(format, args...))
}
