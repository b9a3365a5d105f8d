package pybridge

import (
	"context"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/semaphore"
)

// gatedScripter runs the script calls of all limiters on one client, at most as many at once as
// the client has connections. Without it, 10,000 tasks entering at once start 10,000 go-redis
// calls that wait for a pooled connection with grown goroutine stacks (tens of MB), and the
// last ones can fail with a pool timeout. Callers that wait at the gate keep a small stack.
type gatedScripter struct {
	client redis.UniversalClient
	gate   *semaphore.Weighted
}

func newGatedScripter(client redis.UniversalClient, calls int64) *gatedScripter {
	return &gatedScripter{client: client, gate: semaphore.NewWeighted(calls)}
}

// pass runs call once the gate lets it through, or returns a failed Cmd when ctx ends first.
func (g *gatedScripter) pass(ctx context.Context, call func() *redis.Cmd) *redis.Cmd {
	if err := g.gate.Acquire(ctx, 1); err != nil {
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(err)
		return cmd
	}
	defer g.gate.Release(1)
	return call()
}

func (g *gatedScripter) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return g.pass(ctx, func() *redis.Cmd { return g.client.Eval(ctx, script, keys, args...) })
}

func (g *gatedScripter) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return g.pass(ctx, func() *redis.Cmd { return g.client.EvalSha(ctx, sha1, keys, args...) })
}

func (g *gatedScripter) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return g.pass(ctx, func() *redis.Cmd { return g.client.EvalRO(ctx, script, keys, args...) })
}

func (g *gatedScripter) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return g.pass(ctx, func() *redis.Cmd { return g.client.EvalShaRO(ctx, sha1, keys, args...) })
}

func (g *gatedScripter) ScriptExists(ctx context.Context, hashes ...string) *redis.BoolSliceCmd {
	return g.client.ScriptExists(ctx, hashes...)
}

func (g *gatedScripter) ScriptLoad(ctx context.Context, script string) *redis.StringCmd {
	return g.client.ScriptLoad(ctx, script)
}
