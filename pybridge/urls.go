package pybridge

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/self-limiters/self-limiters/core"
)

// Options of a rediss:// URL that go-redis does not read itself: the names follow redis-py's
// from_url (ssl_ca_certs, ssl_certfile, ssl_keyfile) and go-redis's URLs (skip_verify).
const (
	tlsCAFileOption   = "ssl_ca_certs"
	tlsCertFileOption = "ssl_certfile"
	tlsKeyFileOption  = "ssl_keyfile"
	tlsSkipOption     = "skip_verify"
)

// deployment is a parsed redis_url: how to build the client that runs the scripts and the one
// that waits for wake-ups, with a given pool size.
type deployment struct {
	newClient func(poolSize int) redis.UniversalClient
}

// parseURL turns redis_url into a deployment. The scheme chooses the client:
//
//	redis://, rediss://, unix://          one server (go-redis ParseURL)
//	redis+cluster://, rediss+cluster://   Redis Cluster, seed nodes as host:port and addr= (ParseClusterURL)
//	redis+sentinel://, rediss+sentinel:// a Sentinel master set: sentinels as host:port and addr=,
//	                                      master_name= (ParseFailoverURL)
//
// rediss URLs also take ssl_ca_certs, ssl_certfile, ssl_keyfile and skip_verify. Errors never
// contain the URL's password.
func parseURL(raw string) (*deployment, error) {
	d, err := parseDeployment(raw)
	if err != nil {
		var urlErr *url.Error
		if errors.As(err, &urlErr) {
			err = urlErr.Err // url.Error repeats the whole URL, password included
		}
		return nil, &core.RedisError{Op: "invalid redis_url " + redactURL(raw), Err: errors.New(hideSecrets(err.Error(), raw))}
	}
	return d, nil
}

func parseDeployment(raw string) (*deployment, error) {
	if err := checkUserInfo(raw); err != nil {
		return nil, err
	}
	scheme, rest, found := strings.Cut(raw, "://")
	if !found {
		return nil, errors.New("the URL has no scheme, as in redis://127.0.0.1:6379")
	}
	base, kind, _ := strings.Cut(scheme, "+")
	stripped, tlsOptions, err := takeTLSOptions(base+"://"+rest, base == "rediss")
	if err != nil {
		return nil, err
	}

	switch kind {
	case "":
		opts, err := redis.ParseURL(stripped)
		if err != nil {
			return nil, err
		}
		if err := tlsOptions.finish(opts.TLSConfig, &opts.DialTimeout, &opts.ReadTimeout, &opts.WriteTimeout); err != nil {
			return nil, err
		}
		opts.DisableIdentity = true
		opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
		return &deployment{newClient: func(poolSize int) redis.UniversalClient {
			copied := *opts
			copied.PoolSize = poolSize
			return redis.NewClient(&copied)
		}}, nil

	case "cluster":
		opts, err := redis.ParseClusterURL(stripped)
		if err != nil {
			return nil, err
		}
		if err := checkAddresses(opts.Addrs); err != nil {
			return nil, err
		}
		if err := tlsOptions.finish(opts.TLSConfig, &opts.DialTimeout, &opts.ReadTimeout, &opts.WriteTimeout); err != nil {
			return nil, err
		}
		opts.DisableIdentity = true
		opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
		// Every command of the limiters goes to the node of its keys' slot, so the routing
		// policies, which go-redis reads with COMMAND, are never needed. Without this, an ACL user
		// refused COMMAND would cost a refused COMMAND round trip before every call.
		opts.DisableRoutingPolicies = true
		return &deployment{newClient: func(poolSize int) redis.UniversalClient {
			copied := *opts
			copied.PoolSize = poolSize // per node, as go-redis counts it
			return redis.NewClusterClient(&copied)
		}}, nil

	case "sentinel":
		opts, err := redis.ParseFailoverURL(stripped)
		if err != nil {
			return nil, err
		}
		if err := checkAddresses(opts.SentinelAddrs); err != nil {
			return nil, err
		}
		if opts.MasterName == "" {
			return nil, errors.New("a redis+sentinel:// URL needs master_name=, the name of the master set")
		}
		if err := tlsOptions.finish(opts.TLSConfig, &opts.DialTimeout, &opts.ReadTimeout, &opts.WriteTimeout); err != nil {
			return nil, err
		}
		opts.DisableIdentity = true
		return &deployment{newClient: func(poolSize int) redis.UniversalClient {
			copied := *opts
			copied.PoolSize = poolSize
			client := redis.NewFailoverClient(&copied)
			client.AddHook(masterNameHook{opts.MasterName})
			return client
		}}, nil

	default:
		return nil, fmt.Errorf("unknown deployment %q in the scheme; use redis+cluster:// or redis+sentinel://", kind)
	}
}

// checkAddresses rejects a node address whose port go-redis accepts but cannot dial: 0, or above
// 65535.
func checkAddresses(addrs []string) error {
	for _, addr := range addrs {
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return fmt.Errorf("the node address %q is not host:port", addr)
		}
		if number, err := strconv.Atoi(port); err != nil || number < 1 || number > 65535 {
			return fmt.Errorf("the node address %q needs a port from 1 to 65535", addr)
		}
	}
	return nil
}

// finish completes the options that go-redis parsed from a URL: it loads the TLS files into
// config and sets the timeouts that the URL left unset to this package's defaults.
func (f tlsFiles) finish(config *tls.Config, dial, read, write *time.Duration) error {
	if err := f.apply(config); err != nil {
		return err
	}
	setDefaults(dial, read, write)
	return nil
}

// setDefaults sets the timeouts that the URL left unset to this package's defaults.
func setDefaults(dial, read, write *time.Duration) {
	for _, setting := range []struct {
		value        *time.Duration
		defaultValue time.Duration
	}{{dial, defaultDialTimeout}, {read, defaultReadTimeout}, {write, defaultWriteTimeout}} {
		if *setting.value == 0 {
			*setting.value = setting.defaultValue
		}
	}
}

// tlsFiles are the TLS options of a rediss URL.
type tlsFiles struct {
	caFile, certFile, keyFile string
	skipVerify                bool
}

// takeTLSOptions removes the TLS options from the query of raw, which go-redis would reject as
// unknown, and returns them. They are an error on a URL without TLS.
func takeTLSOptions(raw string, isTLS bool) (string, tlsFiles, error) {
	var files tlsFiles
	beforeQuery, query, hasQuery := strings.Cut(raw, "?")
	if !hasQuery {
		return raw, files, nil
	}
	values, err := url.ParseQuery(query)
	if err != nil {
		return "", files, fmt.Errorf("invalid query: %w", err)
	}
	for _, name := range []string{tlsCAFileOption, tlsCertFileOption, tlsKeyFileOption, tlsSkipOption} {
		if !values.Has(name) {
			continue
		}
		if !isTLS {
			return "", files, fmt.Errorf("the option %s needs a rediss:// URL", name)
		}
		value := values.Get(name)
		values.Del(name)
		switch name {
		case tlsCAFileOption:
			files.caFile = value
		case tlsCertFileOption:
			files.certFile = value
		case tlsKeyFileOption:
			files.keyFile = value
		case tlsSkipOption:
			files.skipVerify = value == "true" || value == "1"
		}
	}
	if (files.certFile == "") != (files.keyFile == "") {
		return "", files, fmt.Errorf("%s and %s go together: the client certificate and its key", tlsCertFileOption, tlsKeyFileOption)
	}
	if len(values) == 0 {
		return beforeQuery, files, nil
	}
	return beforeQuery + "?" + values.Encode(), files, nil
}

// apply loads the files into config, the TLS configuration that go-redis made for a rediss URL.
func (f tlsFiles) apply(config *tls.Config) error {
	if config == nil {
		return nil
	}
	config.InsecureSkipVerify = f.skipVerify
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			return fmt.Errorf("cannot read %s: %w", tlsCAFileOption, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("%s %s holds no PEM certificate", tlsCAFileOption, f.caFile)
		}
		config.RootCAs = pool
	}
	if f.certFile != "" {
		certificate, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
		if err != nil {
			return fmt.Errorf("cannot load %s and %s: %w", tlsCertFileOption, tlsKeyFileOption, err)
		}
		config.Certificates = []tls.Certificate{certificate}
	}
	return nil
}

// Passwords in the query: an option that is a password, and an option value with user info of
// its own, such as addr=user:password@host. The password is submatch 2.
var (
	queryPassword = regexp.MustCompile(`(?i)([?&](?:password|pass|pwd|sentinel_password)=)([^&#]*)`)
	queryUserInfo = regexp.MustCompile(`([?&][^=&#]*=[^:&#@]*:)([^&#]*)@`)
)

// redactURL returns raw with its passwords, if any, replaced by "xxxxx": the password of the
// user info (see userInfoPassword), passwords given as query options, and those in the user info
// of an option such as addr=.
func redactURL(raw string) string {
	scheme, rest, found := strings.Cut(raw, "://")
	if !found {
		return "(not a URL)"
	}
	if start, end, ok := userInfoPassword(rest); ok {
		rest = rest[:start] + "xxxxx" + rest[end:]
	}
	redacted := queryPassword.ReplaceAllString(scheme+"://"+rest, "${1}xxxxx")
	return queryUserInfo.ReplaceAllString(redacted, "${1}xxxxx@")
}

// userInfoEnd returns the index of the '@' that ends the user info of rest, a URL without its
// scheme, or -1 when it has none. That '@' is the last one before the query. When no '@' comes
// before the first '?' or '#', an unescaped '?' or '#' in the password cut it short, and the first
// '@' after it ends the user info, unless an '=' shows that the '@' belongs to a query option
// such as addr=.
func userInfoEnd(rest string) int {
	cut := strings.IndexAny(rest+"?", "?#")
	if at := strings.LastIndexByte(rest[:cut], '@'); at >= 0 {
		return at
	}
	at := strings.IndexByte(rest[cut:], '@')
	if at < 0 || strings.Contains(rest[cut:cut+at], "=") {
		return -1
	}
	return cut + at
}

// userInfoPassword returns where the password of the user info lies in rest, a URL without its
// scheme: from the first ':' to the end of the user info.
func userInfoPassword(rest string) (start, end int, ok bool) {
	end = userInfoEnd(rest)
	start = strings.IndexByte(rest[:max(end, 0)], ':')
	if end < 0 || start < 0 {
		return 0, 0, false
	}
	return start + 1, end, true
}

// hideSecrets returns message with every password of raw replaced by "xxxxx". go-redis's URL
// parsers may quote an option's value in their errors.
func hideSecrets(message, raw string) string {
	var secrets []string
	if _, rest, found := strings.Cut(raw, "://"); found {
		if start, end, ok := userInfoPassword(rest); ok {
			secrets = append(secrets, rest[start:end])
		}
	}
	for _, pattern := range []*regexp.Regexp{queryPassword, queryUserInfo} {
		for _, match := range pattern.FindAllStringSubmatch(raw, -1) {
			secrets = append(secrets, match[2])
		}
	}
	for _, secret := range secrets {
		if secret != "" {
			message = strings.ReplaceAll(message, secret, "xxxxx")
		}
	}
	return message
}

// checkUserInfo rejects a URL whose user name or password contains an unescaped '/', '?' or '#':
// these end the host part early, so part of the password would be read as the port or path.
func checkUserInfo(raw string) error {
	_, rest, _ := strings.Cut(raw, "://")
	if end := userInfoEnd(rest); end >= 0 && strings.ContainsAny(rest[:end], "/?#") {
		return errors.New("the user name or password contains '/', '?' or '#'; percent-encode them (%2F, %3F, %23)")
	}
	return nil
}

// masterNameHook replaces go-redis's error for a master set that no sentinel knows, "all
// sentinels specified in configuration are unreachable: redis: nil" with one line per sentinel,
// by one that names master_name.
type masterNameHook struct{ masterName string }

func (h masterNameHook) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := next(ctx, network, addr)
		if err != nil && errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("no sentinel that answered knows a master set named %q; check master_name", h.masterName)
		}
		return conn, err
	}
}

func (masterNameHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (masterNameHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
