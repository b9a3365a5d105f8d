package core

import (
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// crc16 returns the CRC16-XMODEM checksum (polynomial 0x1021, initial value 0) that Redis
// Cluster uses for key slots, computed bit by bit as in the Redis Cluster specification.
func crc16(data string) uint16 {
	var crc uint16
	for i := 0; i < len(data); i++ {
		crc ^= uint16(data[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}

// hashTag returns the part of key that Redis Cluster hashes: the text between the first "{" and
// the first "}" after it, when that text is not empty, or else the whole key.
func hashTag(key string) string {
	start := strings.IndexByte(key, '{')
	if start < 0 {
		return key
	}
	length := strings.IndexByte(key[start+1:], '}')
	if length <= 0 {
		return key
	}
	return key[start+1 : start+1+length]
}

// keySlot returns the Redis Cluster slot of key.
func keySlot(key string) uint16 {
	return crc16(hashTag(key)) % 16384
}

func TestCRC16SpecVector(t *testing.T) {
	// The Redis Cluster specification gives this output for its CRC16 implementation.
	if got := crc16("123456789"); got != 0x31C3 {
		t.Fatalf("expected crc16(%q) = 0x31C3, got %#04x", "123456789", got)
	}
}

func TestHashTagSpecExamples(t *testing.T) {
	// The examples of the hash tag rule in the Redis Cluster specification.
	cases := []struct{ key, tag string }{
		{"{user1000}.following", "user1000"},
		{"{user1000}.followers", "user1000"},
		{"foo{}{bar}", "foo{}{bar}"},
		{"foo{{bar}}zap", "{bar"},
		{"foo{bar}{zap}", "bar"},
		{"no tag", "no tag"},
		{"open{only", "open{only"},
	}
	for _, tc := range cases {
		if got := hashTag(tc.key); got != tc.tag {
			t.Errorf("expected the hash tag of %q to be %q, got %q", tc.key, tc.tag, got)
		}
	}
}

func TestKeySlotClusterKeyslotVectors(t *testing.T) {
	// Slots returned by CLUSTER KEYSLOT of redis-server 7.0.15 started with --cluster-enabled yes.
	cases := []struct {
		key  string
		slot uint16
	}{
		{"123456789", 12739},
		{"foo{{bar}}zap", 4015},
		{"foo{bar}{zap}", 5061},
		{"foo{}{bar}", 8363},
		{"{user1000}.following", 3443},
		{"__self-limiters:{sem:a}b{c}:holders", 6432},
		{"__self-limiters:{sem:}:holders", 861},
		{"__self-limiters:{tb:{x}}:state", 2402},
	}
	for _, tc := range cases {
		if got := keySlot(tc.key); got != tc.slot {
			t.Errorf("expected slot %d for key %q, as CLUSTER KEYSLOT returns, got %d", tc.slot, tc.key, got)
		}
	}
}

// limiterKeyNames lists every key that a semaphore and a token bucket of name write, with the
// per-owner keys of the semaphore's own owner id.
func limiterKeyNames(t *testing.T, name string) (semaphoreKeys, bucketKeys []string) {
	t.Helper()
	// The client is never used: the constructors do not contact Redis.
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer rdb.Close()

	sem, err := NewSemaphore(rdb, SemaphoreConfig{Name: name, Capacity: 1, Expiry: time.Second})
	if err != nil {
		t.Fatalf("NewSemaphore(%q) failed: %v", name, err)
	}
	prefix, ok := sem.args[0].(string)
	if !ok {
		t.Fatalf("expected the key prefix argument of the semaphore scripts to be a string, got %T", sem.args[0])
	}
	semaphoreKeys = append(semaphoreKeys, sem.keys...)
	// semaphore_common.lua builds the alive key as prefix .. 'alive:' .. owner.
	semaphoreKeys = append(semaphoreKeys, sem.wakeKey, prefix+"alive:"+sem.owner)

	bucket, err := NewTokenBucket(rdb, TokenBucketConfig{Name: name, Capacity: 1, RefillPeriod: time.Second, RefillAmount: 1})
	if err != nil {
		t.Fatalf("NewTokenBucket(%q) failed: %v", name, err)
	}
	return semaphoreKeys, bucket.keys
}

// slotTestNames contains names with braces in every position that could end or open a hash
// tag early.
var slotTestNames = []string{"", "a", "{", "}", "a}b{c", "{x}"}

func TestLimiterKeysOneSlot(t *testing.T) {
	for _, name := range slotTestNames {
		semaphoreKeys, bucketKeys := limiterKeyNames(t, name)
		for kind, keys := range map[string][]string{"semaphore": semaphoreKeys, "token bucket": bucketKeys} {
			slot := keySlot(keys[0])
			for _, key := range keys {
				if !strings.HasPrefix(key, KeyPrefix) {
					t.Errorf("expected %s key %q of name %q to start with %q", kind, key, name, KeyPrefix)
				}
				if hashTag(key) == key {
					t.Errorf("expected %s key %q of name %q to contain a hash tag", kind, key, name)
				}
				if got := keySlot(key); got != slot {
					t.Errorf("expected %s key %q of name %q in slot %d like %q, got slot %d", kind, key, name, slot, keys[0], got)
				}
			}
		}
	}
}

func TestLimiterKeysDistinctPerName(t *testing.T) {
	owners := make(map[string]string)
	for _, name := range slotTestNames {
		semaphoreKeys, bucketKeys := limiterKeyNames(t, name)
		for _, key := range append(semaphoreKeys, bucketKeys...) {
			if other, ok := owners[key]; ok && other != name {
				t.Errorf("expected key %q to belong to one limiter name, got names %q and %q", key, other, name)
			}
			owners[key] = name
		}
	}
}
