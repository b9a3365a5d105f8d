package pybridge

import (
	"context"
	"errors"
	"sync"

	"github.com/redis/go-redis/v9"

	"github.com/self-limiters/self-limiters/core"
)

// errorClasses is the one table that maps Go errors to the Python exception classes that
// self_limiters raises for them. The first entry that matches with errors.Is wins; an error that
// matches none is a Redis failure.
var errorClasses = []struct {
	target error
	class  string
}{
	{core.ErrMaxSleepExceeded, "MaxSleepExceededError"},
	{core.ErrInvalidArgument, "ValueError"},
	{core.ErrRedis, "RedisError"},
	{context.DeadlineExceeded, "RedisError"},
}

const defaultErrorClass = "RedisError"

var (
	errorsMu    sync.Mutex
	errorsByID  = make(map[int64]string)
	nextErrorID int64
)

// storeError keeps err for TakeError and returns its id, a positive number.
func storeError(err error) int64 {
	class := defaultErrorClass
	for _, entry := range errorClasses {
		if errors.Is(err, entry.target) {
			class = entry.class
			break
		}
	}

	errorsMu.Lock()
	defer errorsMu.Unlock()
	nextErrorID++
	errorsByID[nextErrorID] = class + ":" + err.Error()
	return nextErrorID
}

// TakeError returns the error stored under id as "<Python class name>:<message>" and forgets it.
// Every failing call of this package returns the negated id of such an error.
func TakeError(id int64) string {
	errorsMu.Lock()
	defer errorsMu.Unlock()

	text, ok := errorsByID[id]
	if !ok {
		return "RuntimeError:self_limiters bridge: no error is stored under this id"
	}
	delete(errorsByID, id)
	return text
}

// silentLogger drops go-redis's log lines. Every failure they describe reaches Python as an
// exception, and a library must not write to the host process's stderr.
type silentLogger struct{}

func (silentLogger) Printf(context.Context, string, ...any) {}

func init() {
	redis.SetLogger(silentLogger{})
}
