#!/usr/bin/env python3
"""A strict RFC 5424 syslog message parser, for what the end-to-end tests' rsyslog received.

    python3 syslog_check.py FILE...      (or - for stdin)

FILE holds one raw message a line, as the quickstart's rsyslog writes them (template
"%rawmsg%\\n": the message without its RFC 5425 octet-count frame). Each message is printed as
one JSON line

    {"line": N, "pri": 134, "facility": 16, "severity": 6, "version": 1,
     "timestamp": "2024-05-01T12:00:00.123456Z" or null, "hostname": ... or null,
     "app": ... or null, "procid": ... or null, "msgid": ... or null,
     "sd": {"id@32473": {"param": "value", ...}, ...}, "bom": false, "msg": "..." or null}

and the exit status is 1 at the first line that is not valid RFC 5424, with the line number
and the reason on stderr (the lines before it are printed). An empty file is valid (exit 0);
--min N fails with fewer than N messages. As a module:

    from syslog_check import parse, split_octet_counted
    parse(line) -> dict        # str or bytes, without the line end; ValueError if invalid
    split_octet_counted(data) -> list[bytes]   # RFC 5425/6587 MSG-LEN SP SYSLOG-MSG frames

What "strict" checks (RFC 5424 section 6 ABNF and its text):
  PRI      "<" 1*3DIGIT ">" with a value 0..191
  VERSION  exactly "1"
  TIMESTAMP  "-" or FULL-DATE "T" FULL-TIME: upper-case T and Z, a real calendar date, hour
           00-23, minute 00-59, second 00-59 (no leap second, 6.2.3), at most 6 fraction
           digits, offset "Z" or +/-HH:MM (00-23, 00-59)
  HOSTNAME 1..255, APP-NAME 1..48, PROCID 1..128, MSGID 1..32 characters of PRINTUSASCII
           (33..126), or "-"; fields separated by exactly one SP
  STRUCTURED-DATA  "-" or SD-ELEMENTs with no space between them; SD-ID and PARAM-NAME
           1..32 PRINTUSASCII except '=', ' ', ']', '"'; an SD-ID at most once per message
           (6.3.2); an SD-ID without '@' must be one IANA registered (timeQuality, origin,
           meta) with their parameter names, one with '@' must be NAME@ENTERPRISE-NUMBER;
           PARAM-VALUE UTF-8 with '"', '\\' and ']' escaped by '\\' (an unescaped ']' or a
           backslash before another character is a sender error here, though RFC 5424 tells
           receivers to tolerate the latter)
  MSG      absent, or after one SP: a UTF-8 BOM and valid UTF-8 (MSG-UTF8), or any octets
           (MSG-ANY; shown decoded as UTF-8 with backslash escapes for invalid bytes)
"""

import calendar
import json
import re
import sys

NIL = "-"
BOM = b"\xef\xbb\xbf"
REGISTERED = {
    "timeQuality": {"tzKnown", "isSynced", "syncAccuracy"},
    "origin": {"ip", "enterpriseId", "software", "swVersion"},
    "meta": {"sequenceId", "sysUpTime", "language"},
}
TIMESTAMP = re.compile(
    rb"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?(Z|[+-](\d{2}):(\d{2}))\Z"
)
ENTERPRISE = re.compile(r"[0-9]+(\.[0-9]+)*\Z")


def _printable(b):
    return all(33 <= c <= 126 for c in b)


class _Cursor:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def fail(self, why):
        raise ValueError(f"{why} (at byte {self.pos})")

    def peek(self):
        return self.data[self.pos] if self.pos < len(self.data) else None

    def expect(self, byte, what):
        if self.peek() != byte:
            got = "end of message" if self.peek() is None else repr(chr(self.peek()))
            self.fail(f"expected {what}, got {got}")
        self.pos += 1

    def token(self):
        """Bytes up to the next SP or the end."""
        end = self.data.find(b" ", self.pos)
        if end < 0:
            end = len(self.data)
        tok = self.data[self.pos:end]
        self.pos = end
        return tok


def _field(cur, name, maxlen):
    start = cur.pos
    tok = cur.token()
    if not tok:
        cur.pos = start
        cur.fail(f"empty {name} (two spaces, or a missing field)")
    if tok == b"-":
        return None
    if len(tok) > maxlen:
        cur.pos = start
        cur.fail(f"{name} longer than {maxlen} characters ({len(tok)})")
    if not _printable(tok):
        cur.pos = start
        cur.fail(f"{name} {tok!r} has characters outside printable US-ASCII")
    return tok.decode("ascii")


def _timestamp(cur):
    start = cur.pos
    tok = cur.token()
    if tok == b"-":
        return None
    m = TIMESTAMP.match(tok)
    cur.pos = start
    if not m:
        cur.fail(f"TIMESTAMP {tok!r} is not FULL-DATE \"T\" FULL-TIME (RFC 5424 6.2.3)")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if not 1 <= month <= 12:
        cur.fail(f"TIMESTAMP month {month:02d}")
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        cur.fail(f"TIMESTAMP day {day:02d} of {year:04d}-{month:02d}")
    if hour > 23 or minute > 59:
        cur.fail(f"TIMESTAMP time {hour:02d}:{minute:02d}")
    if second > 59:
        cur.fail(f"TIMESTAMP second {second:02d} (leap seconds MUST NOT be used)")
    if m.group(9) is not None and (int(m.group(9)) > 23 or int(m.group(10)) > 59):
        cur.fail(f"TIMESTAMP offset {m.group(8).decode()}")
    cur.pos += len(tok)
    return tok.decode("ascii")


def _sd_name(cur, what):
    start = cur.pos
    while cur.peek() is not None and 33 <= cur.peek() <= 126 and cur.peek() not in b'= ]"':
        cur.pos += 1
    name = cur.data[start:cur.pos]
    if not name:
        cur.fail(f"empty or invalid {what}")
    if len(name) > 32:
        cur.pos = start
        cur.fail(f"{what} {name!r} longer than 32 characters")
    return name.decode("ascii")


def _param_value(cur):
    out = bytearray()
    while True:
        c = cur.peek()
        if c is None:
            cur.fail("PARAM-VALUE not closed by '\"'")
        if c == 0x22:  # '"'
            cur.pos += 1
            break
        if c == 0x5D:  # ']'
            cur.fail("unescaped ']' in PARAM-VALUE")
        if c == 0x5C:  # '\'
            nxt = cur.data[cur.pos + 1] if cur.pos + 1 < len(cur.data) else None
            if nxt is None or nxt not in b'"\\]':
                cur.fail("backslash not followed by '\"', '\\\\' or ']' in PARAM-VALUE "
                         "(an unescaped backslash)")
            out.append(nxt)
            cur.pos += 2
            continue
        out.append(c)
        cur.pos += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as e:
        cur.fail(f"PARAM-VALUE is not valid UTF-8: {e}")


def _structured_data(cur):
    if cur.peek() == ord("-"):
        cur.pos += 1
        return {}
    if cur.peek() != ord("["):
        cur.fail("expected STRUCTURED-DATA ('-' or '[')")
    sd = {}
    while cur.peek() == ord("["):
        cur.pos += 1
        sd_start = cur.pos
        sd_id = _sd_name(cur, "SD-ID")
        if sd_id in sd:
            cur.pos = sd_start
            cur.fail(f"SD-ID {sd_id} appears twice (RFC 5424 6.3.2)")
        if "@" in sd_id:
            name, _, pen = sd_id.partition("@")
            if not name or "@" in pen or not ENTERPRISE.match(pen):
                cur.pos = sd_start
                cur.fail(f"SD-ID {sd_id} is not NAME@PRIVATE-ENTERPRISE-NUMBER")
        elif sd_id not in REGISTERED:
            cur.pos = sd_start
            cur.fail(f"SD-ID {sd_id} has no '@' and is not IANA registered "
                     f"({', '.join(REGISTERED)})")
        params = {}
        while cur.peek() == ord(" "):
            cur.pos += 1
            p_start = cur.pos
            pname = _sd_name(cur, "PARAM-NAME")
            if sd_id in REGISTERED and pname not in REGISTERED[sd_id]:
                cur.pos = p_start
                cur.fail(f"PARAM-NAME {pname} is not defined for SD-ID {sd_id}")
            cur.expect(ord("="), "'=' after PARAM-NAME")
            cur.expect(ord('"'), "'\"' opening PARAM-VALUE")
            value = _param_value(cur)
            # A name may repeat (origin's ip does): then the values are a list.
            if pname in params:
                prev = params[pname]
                params[pname] = (prev if isinstance(prev, list) else [prev]) + [value]
            else:
                params[pname] = value
        cur.expect(ord("]"), "' ' SD-PARAM or ']' closing the SD-ELEMENT")
        sd[sd_id] = params
    return sd


def parse(line):
    """One RFC 5424 SYSLOG-MSG (str or bytes, no trailing line end) -> dict; ValueError."""
    data = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else bytes(line)
    cur = _Cursor(data)
    cur.expect(ord("<"), "'<' starting PRI")
    start = cur.pos
    while cur.peek() is not None and 0x30 <= cur.peek() <= 0x39 and cur.pos - start < 4:
        cur.pos += 1
    digits = data[start:cur.pos]
    if not 1 <= len(digits) <= 3:
        cur.fail("PRIVAL must be 1 to 3 digits")
    pri = int(digits)
    if pri > 191:
        cur.fail(f"PRIVAL {pri} above 191")
    cur.expect(ord(">"), "'>' closing PRI")
    vstart = cur.pos
    version = cur.token()
    if version != b"1":
        cur.pos = vstart
        cur.fail(f"VERSION {version!r}, not 1")
    cur.expect(ord(" "), "SP after VERSION")
    timestamp = _timestamp(cur)
    cur.expect(ord(" "), "SP after TIMESTAMP")
    hostname = _field(cur, "HOSTNAME", 255)
    cur.expect(ord(" "), "SP after HOSTNAME")
    app = _field(cur, "APP-NAME", 48)
    cur.expect(ord(" "), "SP after APP-NAME")
    procid = _field(cur, "PROCID", 128)
    cur.expect(ord(" "), "SP after PROCID")
    msgid = _field(cur, "MSGID", 32)
    cur.expect(ord(" "), "SP after MSGID")
    sd = _structured_data(cur)
    msg, bom = None, False
    if cur.peek() is not None:
        cur.expect(ord(" "), "SP between STRUCTURED-DATA and MSG")
        raw = data[cur.pos:]
        if raw.startswith(BOM):
            bom = True
            try:
                msg = raw[len(BOM):].decode("utf-8")
            except UnicodeDecodeError as e:
                cur.fail(f"MSG starts with a BOM but is not valid UTF-8: {e}")
        else:
            msg = raw.decode("utf-8", "backslashreplace")
    return {
        "pri": pri, "facility": pri >> 3, "severity": pri & 7, "version": 1,
        "timestamp": timestamp, "hostname": hostname, "app": app, "procid": procid,
        "msgid": msgid, "sd": sd, "bom": bom, "msg": msg,
    }


def split_octet_counted(data):
    """RFC 5425 (6587 3.4.1) frames "MSG-LEN SP SYSLOG-MSG" -> the messages; ValueError."""
    out, pos = [], 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 11)
        if sp < 0:
            raise ValueError(f"no MSG-LEN at byte {pos}")
        digits = data[pos:sp]
        if not digits.isdigit() or digits.startswith(b"0"):
            raise ValueError(f"MSG-LEN {digits!r} at byte {pos} is not NONZERO-DIGIT *DIGIT")
        n = int(digits)
        if sp + 1 + n > len(data):
            raise ValueError(f"frame at byte {pos} announces {n} octets, "
                             f"{len(data) - sp - 1} follow")
        out.append(data[sp + 1:sp + 1 + n])
        pos = sp + 1 + n
    return out


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(description="Check that each line is an RFC 5424 message.")
    ap.add_argument("files", nargs="+", metavar="FILE", help="raw messages, one a line; - for stdin")
    ap.add_argument("--min", type=int, default=0, help="fail with fewer messages than this")
    a = ap.parse_args(argv)
    count = 0
    for name in a.files:
        data = sys.stdin.buffer.read() if name == "-" else open(name, "rb").read()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for n, line in enumerate(lines, 1):
            try:
                rec = parse(line)
            except ValueError as e:
                print(f"{name}:{n}: not RFC 5424: {e}: {line[:300]!r}", file=sys.stderr)
                return 1
            rec = {"line": n, **rec}
            if len(a.files) > 1:
                rec = {"file": name, **rec}
            print(json.dumps(rec, ensure_ascii=False))
            count += 1
    if count < a.min:
        print(f"{count} messages, fewer than {a.min}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
