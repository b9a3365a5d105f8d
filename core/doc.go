// Package core implements distributed limiters on Redis: a first-come first-served Semaphore
// with crash-safe leases and a TokenBucket whose schedule is computed on the Redis server clock.
//
// Every acquire and release is one atomic Lua script call (EVALSHA, with the script loaded again
// after NOSCRIPT). All keys of one limiter share a Redis Cluster hash tag, so the package works on
// a single server, behind Sentinel and on Cluster alike. The package has no cgo and no Python: the
// Python bindings live in the pybridge package.
package core
