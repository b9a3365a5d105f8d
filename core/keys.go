package core

// KeyPrefix starts the name of every key the limiters write, so operators can grant an ACL user
// the pattern "~__self-limiters:*".
const KeyPrefix = "__self-limiters:"

// keyBase returns the common start of the keys of one limiter: the prefix, then a hash tag of
// the kind and the name. The tag is never empty because it starts with the kind, and a "}" in the
// name only ends the tag early at the same place for every key of the limiter, so all of them
// land in one Cluster slot whatever the name. Different names give different key sets because
// the suffixes that follow contain no "}".
func keyBase(kind, name string) string {
	return KeyPrefix + "{" + kind + ":" + name + "}:"
}
