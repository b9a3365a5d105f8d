package pybridge

import "golang.org/x/sys/unix"

// monotonicMicros returns CLOCK_MONOTONIC in µs: the clock of Python's time.monotonic() on
// Linux, so that a moment computed here means the same moment to the Python side.
func monotonicMicros() int64 {
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
		panic("self_limiters bridge: clock_gettime(CLOCK_MONOTONIC) failed: " + err.Error())
	}
	return now.Nano() / 1000
}
