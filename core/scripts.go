package core

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

var (
	//go:embed lua/semaphore_common.lua
	semaphoreCommon string
	//go:embed lua/semaphore_acquire.lua
	semaphoreAcquireBody string
	//go:embed lua/semaphore_release.lua
	semaphoreReleaseBody string
	//go:embed lua/semaphore_renew.lua
	semaphoreRenewBody string
	//go:embed lua/token_bucket.lua
	tokenBucketSource string
)

var (
	semaphoreAcquireScript = redis.NewScript(semaphoreCommon + semaphoreAcquireBody)
	semaphoreReleaseScript = redis.NewScript(semaphoreCommon + semaphoreReleaseBody)
	semaphoreRenewScript   = redis.NewScript(semaphoreCommon + semaphoreRenewBody)
	tokenBucketScript      = redis.NewScript(tokenBucketSource)
)

// While a Cluster slot moves to another node, the old node refuses a script that declares keys
// it no longer holds all of with TRYAGAIN, before running any of it. A script that it does start
// fails with a "non local key" error at the first command on a key that has already moved or that
// the script itself emptied, after the commands before it took effect. Both are retried. The
// semaphore scripts are written so that running one again with the same arguments completes it
// without doing anything twice (go-redis may also resend a script after a dropped connection).
// The token bucket script uses only its one declared key, so a node refuses it before it runs
// or runs all of it. The retries come after tryAgainFirstPause, then twice as long each time up to tryAgainMaxPause, for
// at most tryAgainBudget: a slot usually moves within a second, and a caller with an earlier
// deadline stops at its own.
const (
	tryAgainFirstPause = 5 * time.Millisecond
	tryAgainMaxPause   = 200 * time.Millisecond
	tryAgainBudget     = 10 * time.Second
)

// runScript runs script with EVALSHA and, after a NOSCRIPT reply (a restarted server, SCRIPT
// FLUSH, or a Cluster node that never saw it), with EVAL, which also caches it again.
func runScript(ctx context.Context, rdb redis.Scripter, op string, script *redis.Script, keys []string, args ...any) ([]any, error) {
	var giveUp time.Time
	pause := tryAgainFirstPause
	for {
		reply, err := script.Run(ctx, rdb, keys, args...).Slice()
		if err == nil {
			return reply, nil
		}
		if ctxErr := ctx.Err(); ctxErr != nil && errors.Is(err, ctxErr) {
			return nil, ctxErr // the caller gave up; Redis did not fail
		}
		if !slotIsMoving(err) {
			return nil, redisError(op, err)
		}
		if giveUp.IsZero() {
			giveUp = time.Now().Add(tryAgainBudget)
		}
		if time.Now().Add(pause).After(giveUp) {
			return nil, redisError(op, fmt.Errorf("%w (the Cluster slot was still moving after %s)", err, tryAgainBudget))
		}
		timer := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		case <-timer.C:
		}
		pause = min(2*pause, tryAgainMaxPause)
	}
}

// slotIsMoving reports whether err is a refusal that ends once the Cluster slot has moved:
// TRYAGAIN, "non local key", or MOVED and ASK. go-redis follows MOVED and ASK itself, but returns
// them when it runs out of redirections because the slot changed hands during its own retries.
func slotIsMoving(err error) bool {
	var reply redis.Error
	if !errors.As(err, &reply) {
		return false
	}
	message := reply.Error()
	return redis.IsTryAgainError(err) || strings.HasPrefix(message, "MOVED ") || strings.HasPrefix(message, "ASK ") ||
		strings.Contains(message, "non local key")
}

// replyInt returns reply[i] as an int64, or an error naming op when the script returned
// something else, so an unexpected reply never panics.
func replyInt(op string, reply []any, i int) (int64, error) {
	if i >= len(reply) {
		return 0, redisError(op, fmt.Errorf("unexpected script reply of %d elements", len(reply)))
	}
	n, ok := reply[i].(int64)
	if !ok {
		return 0, redisError(op, fmt.Errorf("unexpected script reply element %d: %T", i, reply[i]))
	}
	return n, nil
}

func replyString(op string, reply []any, i int) (string, error) {
	if i >= len(reply) {
		return "", redisError(op, fmt.Errorf("unexpected script reply of %d elements", len(reply)))
	}
	s, ok := reply[i].(string)
	if !ok {
		return "", redisError(op, fmt.Errorf("unexpected script reply element %d: %T", i, reply[i]))
	}
	return s, nil
}
