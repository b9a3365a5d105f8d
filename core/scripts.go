package core

import (
	"context"
	_ "embed"
	"errors"
	"fmt"

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

// runScript runs script with EVALSHA and, after a NOSCRIPT reply (a restarted server, SCRIPT
// FLUSH, or a Cluster node that never saw it), with EVAL, which also caches it again.
func runScript(ctx context.Context, rdb redis.Scripter, op string, script *redis.Script, keys []string, args ...any) ([]any, error) {
	reply, err := script.Run(ctx, rdb, keys, args...).Slice()
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil && errors.Is(err, ctxErr) {
			return nil, ctxErr // the caller gave up; Redis did not fail
		}
		return nil, redisError(op, err)
	}
	return reply, nil
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
