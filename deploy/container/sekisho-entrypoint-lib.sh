# shellcheck shell=sh
# Shared by broker-entrypoint.sh and connector-entrypoint.sh (sourced; not run by itself).
# The sourcing script sets PROG (its name in messages) and STATE_DIR first. In the images it
# sits next to the entrypoints as /usr/local/bin/sekisho-entrypoint-lib.sh.

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# A TOML basic string holding $1.
toml_str() {
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

# Value of the variable named $1, or of the file named by ${1}_FILE (Docker/Kubernetes secrets);
# empty when neither is set.
from_env_or_file() {
    eval "_v=\${$1:-}; _f=\${$1_FILE:-}"
    if [ -n "$_v" ] && [ -n "$_f" ]; then
        die "set $1 or $1_FILE, not both"
    fi
    if [ -n "$_f" ]; then
        [ -r "$_f" ] || die "$1_FILE=$_f cannot be read"
        _v=$(cat "$_f")
    fi
    printf '%s' "$_v"
}

# Replaces every ${NAME} in file $1 by the environment variable NAME (escaped for a TOML string)
# and writes the result to $2.
expand_placeholders() {
    awk '
        # Escaped for a TOML basic string (no gsub: awks disagree about backslashes there).
        function esc(s,    r, c, i) {
            r = ""
            for (i = 1; i <= length(s); i++) {
                c = substr(s, i, 1)
                if (c == "\\" || c == "\"") r = r "\\"
                r = r c
            }
            return r
        }
        {
            line = $0; out = ""
            while (match(line, /\$\{[A-Za-z_][A-Za-z0-9_]*\}/)) {
                name = substr(line, RSTART + 2, RLENGTH - 3)
                if (!(name in ENVIRON)) {
                    printf "%s: error: %s:%d uses ${%s}, but the environment variable %s is not set\n", ENVIRON["PROG"], FILENAME, NR, name, name > "/dev/stderr"
                    failed = 1; exit 1
                }
                out = out substr(line, 1, RSTART - 1) esc(ENVIRON[name])
                line = substr(line, RSTART + RLENGTH)
            }
            print out line
        }
        END { if (failed) exit 1 }
    ' "$1" >"$2.tmp" || {
        rm -f "$2.tmp"
        exit 1
    }
    chmod 600 "$2.tmp"
    mv "$2.tmp" "$2"
}

# The state folder, created and writable; files made from here on are private.
prepare_state_dir() {
    mkdir -p "$STATE_DIR" || die "cannot create the state folder $STATE_DIR (SEKISHO_STATE_DIR)"
    [ -w "$STATE_DIR" ] || die "the state folder $STATE_DIR (SEKISHO_STATE_DIR) is not writable by uid $(id -u)"
    umask 077
}
