package tests_go

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/self-limiters/self-limiters/core"
)

// privateServer starts a redis-server that only this test uses, so the test may stop it.
func privateServer(t *testing.T) (*redisServer, *redis.Client) {
	t.Helper()
	server, err := startRedisServer()
	if err != nil {
		t.Fatalf("cannot start a private redis-server: %v", err)
	}
	t.Cleanup(server.stop)
	rdb := redis.NewClient(clientOptions(server.url))
	t.Cleanup(func() { rdb.Close() })
	return server, rdb
}

func TestSemaphoreWaiterFailsWhenRedisStops(t *testing.T) {
	t.Parallel()
	server, rdb := privateServer(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)
	acquire(t, ctx, newSemaphore(t, rdb, name, 1, 3*time.Second), 0)

	waiter := newSemaphore(t, rdb, name, 1, 3*time.Second)
	result := make(chan error, 1)
	go func() {
		lease, err := waiter.Acquire(ctx, 0)
		if err == nil {
			_ = lease.Release(context.Background())
		}
		result <- err
	}()
	waitForZCard(t, rdb, semaphoreKey(name, "waiters"), 1, 10*time.Second)

	_ = server.cmd.Process.Kill()
	<-server.done
	stopped := time.Now()
	select {
	case err := <-result:
		if !errors.Is(err, core.ErrRedis) {
			t.Fatalf("expected the waiter to fail with a RedisError once Redis stopped, got %v", err)
		}
		t.Logf("the waiter failed %v after Redis stopped: %v", time.Since(stopped).Round(time.Millisecond), err)
	case <-time.After(15 * time.Second):
		t.Fatalf("expected the waiter to fail within 15s of Redis stopping, but it still waits")
	}
}

func TestSemaphoreWaiterSurvivesClientKill(t *testing.T) {
	t.Parallel()
	_, rdb := privateServer(t)
	name := uniqueName(t)
	ctx := testContext(t, 60*time.Second)
	holder := acquire(t, ctx, newSemaphore(t, rdb, name, 1, 3*time.Second), 0)

	waiter := newSemaphore(t, rdb, name, 1, 3*time.Second)
	result := make(chan error, 1)
	go func() {
		lease, err := waiter.Acquire(ctx, 0)
		if err == nil {
			err = lease.Release(context.Background())
		}
		result <- err
	}()
	waitForZCard(t, rdb, semaphoreKey(name, "waiters"), 1, 10*time.Second)

	// Drop every connection of the limiters, among them the one blocked in BLPOP. The killing
	// connection is spared by SKIPME, which is the default.
	if err := rdb.Do(ctx, "CLIENT", "KILL", "TYPE", "normal").Err(); err != nil {
		t.Fatalf("CLIENT KILL failed: %v", err)
	}
	time.Sleep(500 * time.Millisecond)
	release(t, ctx, holder)

	select {
	case err := <-result:
		if err != nil {
			t.Fatalf("expected the waiter to get the slot on new connections after CLIENT KILL, got %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("expected the waiter to get the slot within 15s of the release, but it still waits")
	}
	if n := zcard(t, rdb, semaphoreKey(name, "holders")); n != 0 {
		t.Fatalf("expected no holder after both released, got %d", n)
	}
}
