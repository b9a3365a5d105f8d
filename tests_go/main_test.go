// Package tests_go tests the limiters of package core against a real redis-server, as a user of
// the package would.
//
// The suite uses the server at SL_REDIS_URL when that variable is set. Otherwise TestMain starts
// a private redis-server on a free 127.0.0.1 port, without persistence, and stops it at the end.
// Every test uses limiter names of its own, so tests can share the server and run in parallel.
// Some tests run SCRIPT FLUSH, which clears the script cache of the whole server.
package tests_go

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/self-limiters/self-limiters/core"
)

// redisURL is the URL of the server under test, set by TestMain.
var redisURL string

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		os.Exit(runCrashChild())
	}

	redisURL = os.Getenv("SL_REDIS_URL")
	stop := func() {}
	if redisURL == "" {
		server, err := startRedisServer()
		if err != nil {
			fmt.Fprintf(os.Stderr, "tests_go: cannot start redis-server: %v\n", err)
			os.Exit(1)
		}
		redisURL = server.url
		stop = server.stop
	}

	code := m.Run()
	stop()
	os.Exit(code)
}

// redisServer is a private redis-server process started by startRedisServer.
type redisServer struct {
	url  string
	cmd  *exec.Cmd
	dir  string
	done chan struct{} // closed when the process has exited
}

// startRedisServer starts redis-server on a free loopback port, retrying on another port when the
// chosen one was taken in the meantime, and returns once the server replies to PING.
func startRedisServer() (*redisServer, error) {
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		server, err := tryStartRedisServer()
		if err == nil {
			return server, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func tryStartRedisServer() (*redisServer, error) {
	dir, err := os.MkdirTemp("", "tests_go-redis-")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}

	logFile := filepath.Join(dir, "redis.log")
	cmd := exec.Command("redis-server",
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--logfile", logFile,
	)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	server := &redisServer{
		url:  fmt.Sprintf("redis://127.0.0.1:%d/0", port),
		cmd:  cmd,
		dir:  dir,
		done: make(chan struct{}),
	}
	go func() {
		_ = cmd.Wait()
		close(server.done)
	}()

	rdb := redis.NewClient(clientOptions(server.url))
	defer rdb.Close()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-server.done:
			log, _ := os.ReadFile(logFile)
			os.RemoveAll(dir)
			return nil, fmt.Errorf("redis-server on port %d exited at start; its log:\n%s", port, log)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := rdb.Ping(ctx).Err()
		cancel()
		if err == nil {
			return server, nil
		}
		time.Sleep(50 * time.Millisecond)
	}

	server.stop()
	return nil, fmt.Errorf("redis-server on port %d did not reply to PING within 10s", port)
}

// stop ends the server with SIGTERM, or SIGKILL after 10 s, and removes its directory.
func (s *redisServer) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
	os.RemoveAll(s.dir)
}

// freePort returns a loopback TCP port that was free a moment ago. Nothing listens on it when the
// function returns.
func freePort() (int, error) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	port := listener.Addr().(*net.TCPAddr).Port
	if err := listener.Close(); err != nil {
		return 0, err
	}
	return port, nil
}

// clientOptions parses url and turns off the connection handshakes that Redis 7.0 does not
// know (CLIENT SETINFO and maintenance notifications), so the logs show only real failures.
func clientOptions(url string) *redis.Options {
	opts, err := redis.ParseURL(url)
	if err != nil {
		panic(fmt.Sprintf("invalid Redis URL %q: %v", url, err))
	}
	opts.DisableIdentity = true
	opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	return opts
}

// newClient returns a client of the server under test, closed when the test ends.
func newClient(t testing.TB) *redis.Client {
	t.Helper()
	rdb := redis.NewClient(clientOptions(redisURL))
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// closedPortClient returns a client of a loopback port on which nothing listens, with no retries
// so that each call fails fast.
func closedPortClient(t testing.TB) *redis.Client {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatalf("cannot find a free port: %v", err)
	}
	opts := clientOptions(fmt.Sprintf("redis://127.0.0.1:%d/0", port))
	opts.MaxRetries = -1
	opts.DialTimeout = time.Second
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// uniqueName returns a limiter name that no other test or run uses.
func uniqueName(t testing.TB) string {
	var suffix [6]byte
	_, _ = rand.Read(suffix[:])
	return t.Name() + ":" + hex.EncodeToString(suffix[:])
}

// testContext returns a context that ends when the test ends or after timeout.
func testContext(t testing.TB, timeout time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

// The key names below follow the layout of core/keys.go and core/lua/semaphore_common.lua:
// KeyPrefix, a hash tag of the kind and the name, then one suffix per key. core/keys_test.go
// checks core's side of that layout.

func semaphoreKey(name, suffix string) string {
	return core.KeyPrefix + "{sem:" + name + "}:" + suffix
}

func bucketKey(name string) string {
	return core.KeyPrefix + "{tb:" + name + "}:state"
}

// limiterKeys returns every key of the limiter name of kind "sem" or "tb", found with SCAN. The
// name must not contain the glob characters *?[]\.
func limiterKeys(t testing.TB, rdb *redis.Client, kind, name string) []string {
	t.Helper()
	if strings.ContainsAny(name, `*?[]\`) {
		t.Fatalf("limiter name %q contains a glob character", name)
	}
	pattern := core.KeyPrefix + "{" + kind + ":" + name + "}:*"
	var keys []string
	iter := rdb.Scan(context.Background(), 0, pattern, 1000).Iterator()
	for iter.Next(context.Background()) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		t.Fatalf("SCAN %s failed: %v", pattern, err)
	}
	return keys
}

// zcard returns the number of members of a sorted set, failing the test on a Redis error.
func zcard(t testing.TB, rdb *redis.Client, key string) int64 {
	t.Helper()
	n, err := rdb.ZCard(context.Background(), key).Result()
	if err != nil {
		t.Fatalf("ZCARD %s failed: %v", key, err)
	}
	return n
}

// waitFor polls condition every 20 ms until it returns true, and fails the test with the last
// description it returned when timeout passes first.
func waitFor(t testing.TB, timeout time.Duration, condition func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, description := condition()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v: %s", timeout, description)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitForZCard waits until the sorted set key has want members.
func waitForZCard(t testing.TB, rdb *redis.Client, key string, want int64, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, func() (bool, string) {
		n := zcard(t, rdb, key)
		return n == want, fmt.Sprintf("expected ZCARD %s = %d, got %d", key, want, n)
	})
}

// Crash child: some tests run the test binary again with crashChildEnv set to a crash mode, and
// kill that child process with SIGKILL. The child joins the semaphore named in crashChildNameEnv
// with capacity 1 and crashChildExpiry. In crashModeHold it acquires, prints crashChildReady and
// holds the slot until it is killed. In crashModeWait it waits in Acquire until it is killed.
const (
	crashChildEnv     = "SL_TEST_CRASH_CHILD"
	crashChildNameEnv = "SL_TEST_CRASH_CHILD_NAME"
	crashChildReady   = "acquired"
	crashChildExpiry  = time.Second

	crashModeHold = "hold"
	crashModeWait = "wait"
)

func runCrashChild() int {
	mode := os.Getenv(crashChildEnv)
	if mode != crashModeHold && mode != crashModeWait {
		fmt.Fprintf(os.Stderr, "crash child: invalid %s %q, expected %q or %q\n", crashChildEnv, mode, crashModeHold, crashModeWait)
		return 1
	}
	rdb := redis.NewClient(clientOptions(os.Getenv("SL_REDIS_URL")))
	sem, err := core.NewSemaphore(rdb, core.SemaphoreConfig{
		Name:     os.Getenv(crashChildNameEnv),
		Capacity: 1,
		Expiry:   crashChildExpiry,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "crash child: NewSemaphore failed: %v\n", err)
		return 1
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = sem.Acquire(ctx, 0)
	if mode == crashModeWait {
		fmt.Fprintf(os.Stderr, "crash child: expected to wait until killed, but Acquire returned error %v\n", err)
		return 1
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "crash child: Acquire failed: %v\n", err)
		return 1
	}
	fmt.Println(crashChildReady)

	// Hold the slot, renewed in the background, until the parent kills this process.
	time.Sleep(time.Minute)
	fmt.Fprintln(os.Stderr, "crash child: not killed within a minute")
	return 1
}

// startCrashChild starts a crash child in mode on the semaphore name. In crashModeHold it
// returns once the child holds the slot. The child is killed when the test ends, if it still runs.
func startCrashChild(t *testing.T, name, mode string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(),
		crashChildEnv+"="+mode,
		crashChildNameEnv+"="+name,
		"SL_REDIS_URL="+redisURL,
	)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("cannot create the crash child's stdout pipe: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("cannot start the crash child %s: %v", os.Args[0], err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	lines := make(chan string, 1)
	go func() {
		scanner := bufio.NewScanner(stdout)
		for scanner.Scan() {
			select {
			case lines <- scanner.Text():
			default:
			}
		}
		_ = cmd.Wait()
		close(exited)
	}()
	if mode != crashModeHold {
		return cmd
	}

	select {
	case line := <-lines:
		if line != crashChildReady {
			t.Fatalf("expected the crash child to print %q, got %q", crashChildReady, line)
		}
	case <-exited:
		t.Fatalf("the crash child exited before it acquired the semaphore")
	case <-time.After(30 * time.Second):
		t.Fatalf("the crash child did not acquire the semaphore within 30s")
	}
	return cmd
}

// requireRedisError fails the test unless err, returned by call, matches core.ErrRedis and is a
// *core.RedisError.
func requireRedisError(t testing.TB, err error, call string) {
	t.Helper()
	if !errors.Is(err, core.ErrRedis) {
		t.Fatalf("%s: expected an error matching core.ErrRedis, got %v", call, err)
	}
	var redisErr *core.RedisError
	if !errors.As(err, &redisErr) {
		t.Fatalf("%s: expected a *core.RedisError, got %T: %v", call, err, err)
	}
}
