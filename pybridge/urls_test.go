package pybridge

import (
	"errors"
	"strings"
	"testing"

	"github.com/self-limiters/self-limiters/core"
)

func TestRedactURL(t *testing.T) {
	cases := []struct{ raw, want string }{
		{"redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"},
		{"redis://user:hunter2@127.0.0.1:6379/0", "redis://user:xxxxx@127.0.0.1:6379/0"},
		{"redis://:hunter2@127.0.0.1:6379", "redis://:xxxxx@127.0.0.1:6379"},
		{"redis://user:hun@ter2@127.0.0.1:6379", "redis://user:xxxxx@127.0.0.1:6379"},
		{"redis://user:hunter2?x@127.0.0.1:6379", "redis://user:xxxxx@127.0.0.1:6379"},
		{"redis://user:hunter2#x@127.0.0.1:6379", "redis://user:xxxxx@127.0.0.1:6379"},
		{"redis://user:hunter2/x@127.0.0.1:6379", "redis://user:xxxxx@127.0.0.1:6379"},
		{"redis://127.0.0.1:6379/0?password=hunter2&db=1", "redis://127.0.0.1:6379/0?password=xxxxx&db=1"},
		{
			"redis+cluster://u:hunter2@127.0.0.1:7000?addr=u2:hunter3@127.0.0.1:7001",
			"redis+cluster://u:xxxxx@127.0.0.1:7000?addr=u2:xxxxx@127.0.0.1:7001",
		},
		{"redis+cluster://127.0.0.1:7000?addr=u2:hunter3@127.0.0.1:7001", "redis+cluster://127.0.0.1:7000?addr=u2:xxxxx@127.0.0.1:7001"},
		{"127.0.0.1:6379", "(not a URL)"},
	}
	for _, c := range cases {
		if got := redactURL(c.raw); got != c.want {
			t.Errorf("redactURL(%q) = %q, want %q", c.raw, got, c.want)
		}
	}
}

func TestParseURLErrorsHidePasswords(t *testing.T) {
	cases := []struct{ raw, part string }{
		{"redis+cluster://u:hunter2@127.0.0.1:7000?addr=u2:hunter3@127.0.0.1:7001", "addr"},
		{"redis+cluster://u:hunter2@127.0.0.1:7000?addr=127.0.0.1:70000", "127.0.0.1:70000"},
		{"redis+cluster://u:hunter2@127.0.0.1:7000?addr=127.0.0.1:0", "127.0.0.1:0"},
		{"redis+sentinel://u:hunter2@127.0.0.1:26379?addr=127.0.0.1:99999&master_name=m", "127.0.0.1:99999"},
		{"redis://user:hunter2?x@127.0.0.1:6379", "percent-encode"},
		{"redis://user:hunter2@127.0.0.1:6379/0?bogus=1", "bogus"},
	}
	for _, c := range cases {
		_, err := parseURL(c.raw)
		if err == nil {
			t.Errorf("parseURL(%q) succeeded, want an error naming %q", c.raw, c.part)
			continue
		}
		message := err.Error()
		if !errors.Is(err, core.ErrRedis) {
			t.Errorf("parseURL(%q) error %q is not a RedisError", c.raw, message)
		}
		if !strings.Contains(message, c.part) {
			t.Errorf("parseURL(%q) error %q does not name %q", c.raw, message, c.part)
		}
		if strings.Contains(message, "hunter") {
			t.Errorf("parseURL(%q) error %q shows a password", c.raw, message)
		}
	}
}

func TestHideSecrets(t *testing.T) {
	raw := "redis+cluster://u:hunter2@127.0.0.1:7000?addr=u2:hunter3@127.0.0.1:7001&password=hunter4"
	message := "bad values hunter2, 'u2:hunter3@127.0.0.1:7001' and hunter4"
	want := "bad values xxxxx, 'u2:xxxxx@127.0.0.1:7001' and xxxxx"
	if got := hideSecrets(message, raw); got != want {
		t.Errorf("hideSecrets = %q, want %q", got, want)
	}
}
