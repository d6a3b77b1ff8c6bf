#!/usr/bin/env python3
"""A stand-in for `helm template`, for the part of Go's text/template and Helm's functions that
the charts in this folder use. tests/tests/deploy.rs renders the chart with it where no helm is
installed, so that the chart's templates are still executed and their output checked. It is not
Helm: install with helm.

    render.py CHART [-f VALUES.yaml ...] [--name RELEASE] [--namespace NS] [--notes]

Prints the rendered manifests as `helm template` does ("---" and "# Source: FILE" before each
document), or with --notes the rendered NOTES.txt. A template error (a `fail`, a field of a
missing value, an unknown function, a syntax error) prints "Error: ..." and exits 1.

Semantics follow Go and Helm where the charts depend on them: values are read as JSON numbers
(float64, so a large number printed without `int` comes out as 1e+06, as with Helm), `.a.b` on
a missing `a` is an error ("nil pointer evaluating"), a missing map key is empty, {{- and -}}
trim whitespace, and/or return operands, variables are scoped to their block, and `include`,
`toYaml`, `nindent`, `quote`, `printf` and friends behave like their Helm/Sprig namesakes.
Requires PyYAML.
"""

import hashlib
import math
import os
import re
import sys

import yaml


class TemplateError(Exception):
    """A template error; `located` once its message names the file and line."""

    def __init__(self, msg, located=False):
        super().__init__(msg)
        self.located = located


# ---------------------------------------------------------------------------------------------
# Lexing and parsing

ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)


def lex(src, name):
    """Yields ('text', s) and ('action', body, line) with whitespace trimming applied."""
    out = []
    pos = 0
    while True:
        m = ACTION.search(src, pos)
        if not m:
            out.append(["text", src[pos:]])
            break
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(["text", text])
        body = m.group(2)
        line = src.count("\n", 0, m.start()) + 1
        out.append(["action", body.strip(), line])
        pos = m.end()
        if m.group(3):
            while pos < len(src) and src[pos] in " \t\r\n":
                pos += 1
    return out


TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<decl>:=)
    | (?P<assign>=)
    | (?P<pipe>\|)
    | (?P<lp>\()
    | (?P<rp>\))(?P<rpfield>(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<comma>,)
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.X,
)


def tokenize(body, where):
    toks = []
    pos = 0
    body = body.rstrip()
    while pos < len(body):
        m = TOKEN.match(body, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"{where}: cannot parse {body[pos:]!r}")
        kind = m.lastgroup
        if kind == "rpfield":
            kind = "rp"
        val = m.group(kind)
        if kind == "rp":
            toks.append(("rp", m.group("rpfield") or ""))
        else:
            toks.append((kind, val))
        pos = m.end()
    return toks


def go_unquote(s):
    return bytes(s[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


class Parser:
    """Parses a pipeline: [decl] command ('|' command)*; command: operand+."""

    def __init__(self, toks, where):
        self.toks = toks
        self.i = 0
        self.where = where

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def pipeline(self, allow_decl=True):
        decl = None
        if allow_decl:
            # $x := …, $x = …, $i, $v := …
            j = self.i
            names = []
            while j < len(self.toks) and self.toks[j][0] == "var":
                names.append(self.toks[j][1])
                if j + 1 < len(self.toks) and self.toks[j + 1][0] == "comma":
                    j += 2
                    continue
                j += 1
                break
            if names and j < len(self.toks) and self.toks[j][0] in ("decl", "assign"):
                decl = (self.toks[j][0], names)
                self.i = j + 1
        cmds = [self.command()]
        while self.peek()[0] == "pipe":
            self.take()
            cmds.append(self.command())
        return ("pipeline", decl, cmds)

    def command(self):
        args = []
        while True:
            kind, _ = self.peek()
            if kind in (None, "pipe", "rp"):
                break
            args.append(self.operand())
        if not args:
            raise TemplateError(f"{self.where}: empty command")
        return args

    def operand(self):
        kind, val = self.take()
        if kind == "str":
            return ("lit", go_unquote(val))
        if kind == "raw":
            return ("lit", val[1:-1])
        if kind == "num":
            return ("lit", float(val) if "." in val else int(val))
        if kind == "field":
            return ("field", None, [] if val == "." else val[1:].split("."))
        if kind == "var":
            parts = val.split(".")
            return ("field", parts[0], parts[1:])
        if kind == "ident":
            if val in ("true", "false"):
                return ("lit", val == "true")
            if val == "nil":
                return ("lit", None)
            return ("ident", val)
        if kind == "lp":
            p = self.pipeline(allow_decl=False)
            k, fields = self.take()
            if k != "rp":
                raise TemplateError(f"{self.where}: missing )")
            node = ("paren", p)
            if fields:
                node = ("chain", node, fields[1:].split("."))
            return node
        raise TemplateError(f"{self.where}: unexpected {val!r}")


def parse(src, name, defines):
    """Returns the node list of a template; {{define}} blocks go into `defines`."""
    items = lex(src, name)
    pos = 0

    def block(stop):
        nonlocal pos
        nodes = []
        while pos < len(items):
            it = items[pos]
            pos += 1
            if it[0] == "text":
                if it[1]:
                    nodes.append(("text", it[1]))
                continue
            body, line = it[1], it[2]
            where = f"{name}:{line}"
            if body.startswith("/*"):
                if not body.endswith("*/"):
                    raise TemplateError(f"{where}: unclosed comment")
                continue
            word = body.split(None, 1)[0] if body else ""
            rest = body[len(word):].strip()
            if word in ("end", "else"):
                if word not in stop:
                    raise TemplateError(f"{where}: unexpected {{{{{word}}}}}")
                return nodes, word, rest, where
            if word in ("if", "with", "range"):
                nodes.append(control(word, rest, where))
                continue
            if word == "define":
                tname = go_unquote(rest)
                body_nodes, _, _, _ = block(("end",))
                defines[tname] = body_nodes
                continue
            if word in ("template", "block", "break", "continue"):
                raise TemplateError(f"{where}: {{{{{word}}}}} is not supported by render.py")
            p = Parser(tokenize(body, where), where)
            pl = p.pipeline()
            if p.i != len(p.toks):
                raise TemplateError(f"{where}: unexpected {p.toks[p.i][1]!r}")
            nodes.append(("action", pl, where))
        if stop != ("eof",):
            raise TemplateError(f"{name}: missing {{{{end}}}}")
        return nodes, "eof", "", name

    def control(word, rest, where):
        p = Parser(tokenize(rest, where), where).pipeline(allow_decl=(word == "range"))
        body_nodes, how, erest, ewhere = block(("end", "else"))
        else_nodes = []
        if how == "else":
            if word == "if" and erest.startswith("if "):
                # {{else if …}}: a nested if that ends at the same {{end}}.
                else_nodes = [control("if", erest[3:].strip(), ewhere)]
            elif erest:
                raise TemplateError(f"{ewhere}: unexpected {{{{else {erest}}}}}", True)
            else:
                else_nodes, _, _, _ = block(("end",))
        return (word, p, body_nodes, else_nodes, where)

    nodes, _, _, _ = block(("eof",))
    return nodes


# ---------------------------------------------------------------------------------------------
# Values and Go formatting

def to_json_numbers(v):
    """Helm reads values as JSON: every number is a float64."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, list):
        return [to_json_numbers(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_json_numbers(x) for k, x in v.items()}
    return str(v)


def go_float(f):
    """fmt's %v of a float64: strconv's 'g' with the shortest digits, which switches to the
    exponent form when the exponent is below -4 or at least 6 (so 1000000 prints 1e+06)."""
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if math.isnan(f):
        return "NaN"
    if f == 0:
        return "0"
    r = repr(f)
    m = re.match(r"^(-?)(\d+)(?:\.(\d+))?(?:e([+-]\d+))?$", r)
    sign, ip, fp, ex = m.group(1), m.group(2), m.group(3) or "", int(m.group(4) or 0)
    digits = (ip + fp).lstrip("0")
    point = len(ip) + ex - (len(ip + fp) - len((ip + fp).lstrip("0")))
    digits = digits.rstrip("0") or "0"
    exp = point - 1
    if exp < -4 or exp >= 6:
        mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mant}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def go_str(v):
    """fmt's %v."""
    if v is None:
        return ""  # Helm prints "<no value>" and then removes it
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return go_float(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "[" + " ".join(go_str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{go_str(v[k])}" for k in sorted(v)) + "]"
    return str(v)


def go_quote(s):
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_printf(fmt, args):
    out = []
    i = 0
    ai = 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        i += 1
        verb = fmt[i]
        i += 1
        if verb == "%":
            out.append("%")
            continue
        if ai >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        a = args[ai]
        ai += 1
        if verb in "sv":
            out.append(go_str(a))
        elif verb == "d":
            if isinstance(a, bool) or not isinstance(a, (int, float)) or (
                isinstance(a, float) and a != int(a)
            ):
                out.append(f"%!d({type(a).__name__}={go_str(a)})")
            elif isinstance(a, float):
                # A float64 under %d is a format error in Go.
                out.append(f"%!d(float64={go_str(a)})")
            else:
                out.append(str(a))
        elif verb == "q":
            out.append(go_quote(go_str(a)))
        else:
            raise TemplateError(f"printf verb %{verb} is not supported by render.py")
    if ai < len(args):
        out.append("%!(EXTRA " + ", ".join(go_str(a) for a in args[ai:]) + ")")
    return "".join(out)


def truthy(v):
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, dict)):
        return len(v) > 0
    return True


def to_int(v):
    if v is None:
        return 0
    if isinstance(v, bool):
        return 1 if v else 0
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            try:
                return int(float(v))
            except ValueError:
                return 0
    return 0


def to_yaml(v):
    def plain(x):
        if isinstance(x, float) and x == int(x) and abs(x) < 2**53:
            return int(x)
        if isinstance(x, list):
            return [plain(y) for y in x]
        if isinstance(x, dict):
            return {k: plain(y) for k, y in x.items()}
        return x

    if v is None:
        return "null"
    text = yaml.safe_dump(plain(v), default_flow_style=False, sort_keys=True, allow_unicode=True)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.rstrip("\n")


def indent_text(n, s):
    pad = " " * n
    return pad + s.replace("\n", "\n" + pad)


# ---------------------------------------------------------------------------------------------
# Execution

class Engine:
    def __init__(self, defines):
        self.defines = defines
        self.funcs = {
            "include": self.f_include,
            "default": lambda d, *v: (v[0] if v and truthy(v[0]) else d),
            "trunc": lambda n, s: s[: to_int(n)] if to_int(n) >= 0 else s[to_int(n):],
            "trimSuffix": lambda suf, s: s[: -len(suf)] if suf and s.endswith(suf) else s,
            "trimPrefix": lambda pre, s: s[len(pre):] if pre and s.startswith(pre) else s,
            "trim": lambda s: s.strip(),
            "contains": lambda sub, s: sub in s,
            "hasPrefix": lambda pre, s: go_str(s).startswith(pre),
            "hasSuffix": lambda suf, s: go_str(s).endswith(suf),
            "replace": lambda old, new, s: go_str(s).replace(old, new),
            "lower": lambda s: go_str(s).lower(),
            "upper": lambda s: go_str(s).upper(),
            "printf": lambda fmt, *a: go_printf(fmt, a),
            "print": self.f_print,
            "quote": lambda *a: " ".join(go_quote(go_str(x)) for x in a if x is not None),
            "squote": lambda *a: " ".join("'" + go_str(x) + "'" for x in a if x is not None),
            "nindent": lambda n, s: "\n" + indent_text(to_int(n), go_str(s)),
            "indent": lambda n, s: indent_text(to_int(n), go_str(s)),
            "toYaml": to_yaml,
            "len": self.f_len,
            "int": to_int,
            "int64": to_int,
            "toString": go_str,
            "eq": self.f_eq,
            "ne": lambda a, b: not self.f_eq(a, b),
            "lt": lambda a, b: self.cmp(a, b) < 0,
            "le": lambda a, b: self.cmp(a, b) <= 0,
            "gt": lambda a, b: self.cmp(a, b) > 0,
            "ge": lambda a, b: self.cmp(a, b) >= 0,
            "not": lambda a: not truthy(a),
            "empty": lambda a: not truthy(a),
            "fail": self.f_fail,
            "required": self.f_required,
            "sha256sum": lambda s: hashlib.sha256(go_str(s).encode()).hexdigest(),
            "join": lambda sep, lst: sep.join(go_str(x) for x in (lst or [])),
            "ternary": lambda a, b, c: a if truthy(c) else b,
            "add": lambda *a: sum(to_int(x) for x in a),
            "sub": lambda a, b: to_int(a) - to_int(b),
            "index": self.f_index,
            "list": lambda *a: list(a),
            "kindIs": lambda k, v: self.kind(v) == k,
        }

    @staticmethod
    def kind(v):
        if v is None:
            return "invalid"
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, float):
            return "float64"
        if isinstance(v, int):
            return "int"
        if isinstance(v, str):
            return "string"
        if isinstance(v, list):
            return "slice"
        if isinstance(v, dict):
            return "map"
        return "invalid"

    @staticmethod
    def num(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TemplateError(f"incompatible types for comparison: {go_str(v)!r}")
        return v

    def cmp(self, a, b):
        self.num(a)
        self.num(b)
        if type(a) is not type(b):
            raise TemplateError(
                f"incompatible types for comparison: {self.kind(a)} and {self.kind(b)}"
            )
        return (a > b) - (a < b)

    @staticmethod
    def f_eq(a, *bs):
        for b in bs:
            na = isinstance(a, (int, float)) and not isinstance(a, bool)
            nb = isinstance(b, (int, float)) and not isinstance(b, bool)
            if na and nb and type(a) is not type(b):
                raise TemplateError(
                    f"incompatible types for comparison: {Engine.kind(a)} and {Engine.kind(b)}"
                )
            if a == b:
                return True
        return False

    @staticmethod
    def f_len(v):
        if v is None:
            raise TemplateError("len of nil pointer")
        if isinstance(v, (str, list, dict)):
            return len(v)
        raise TemplateError(f"len of type {Engine.kind(v)}")

    @staticmethod
    def f_index(coll, *keys):
        for k in keys:
            if isinstance(coll, list):
                k = to_int(k)
                if not 0 <= k < len(coll):
                    raise TemplateError(f"index out of range: {k}")
                coll = coll[k]
            elif isinstance(coll, dict):
                coll = coll.get(k)
            else:
                raise TemplateError(f"cannot index {Engine.kind(coll)}")
        return coll

    @staticmethod
    def f_print(*a):
        out = ""
        for i, x in enumerate(a):
            if i > 0 and not isinstance(x, str) and not isinstance(a[i - 1], str):
                out += " "
            out += go_str(x)
        return out

    @staticmethod
    def f_fail(msg):
        raise TemplateError(f"execution error: {msg}")

    @staticmethod
    def f_required(msg, v):
        if not truthy(v) and v is not False:
            raise TemplateError(f"execution error: {msg}")
        return v

    def f_include(self, name, data):
        if name not in self.defines:
            raise TemplateError(f'no template "{name}" associated with template')
        return self.run(self.defines[name], data)

    # -- evaluation

    def run(self, nodes, dot):
        out = []
        self.exec_list(nodes, dot, [{"$": dot}], out)
        return "".join(out)

    def lookup_var(self, scopes, name, where):
        for s in reversed(scopes):
            if name in s:
                return s
        raise TemplateError(f'{where}: undefined variable "{name}"', True)

    def fields(self, v, names, where, start):
        path = start
        for n in names:
            if isinstance(v, dict):
                v = v.get(n)
            elif v is None:
                raise TemplateError(
                    f"{where}: nil pointer evaluating interface {{}}.{n} ({path})", True
                )
            else:
                raise TemplateError(f"{where}: can't evaluate field {n} in type {self.kind(v)}", True)
            path += "." + n
        return v

    def operand(self, node, dot, scopes, where, final=None):
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "field":
            var, names = node[1], node[2]
            base = dot if var is None else self.lookup_var(scopes, var, where)[var]
            return self.fields(base, names, where, var or "")
        if kind == "paren":
            return self.pipeline(node[1], dot, scopes, where)
        if kind == "chain":
            return self.fields(self.operand(node[1], dot, scopes, where), node[2], where, "(…)")
        if kind == "ident":
            return self.call(node[1], [], dot, scopes, where, final)
        raise TemplateError(f"{where}: bad operand")

    def call(self, name, argnodes, dot, scopes, where, final):
        # and/or evaluate lazily.
        if name in ("and", "or"):
            args = list(argnodes) + ([("lit", final[0])] if final else [])
            v = None
            for a in args:
                v = self.operand(a, dot, scopes, where)
                if (name == "and") != truthy(v):
                    return v
            return v
        f = self.funcs.get(name)
        if f is None:
            raise TemplateError(f'{where}: function "{name}" not defined')
        args = [self.operand(a, dot, scopes, where) for a in argnodes]
        if final:
            args.append(final[0])
        try:
            return f(*args)
        except TemplateError as e:
            if e.located:
                raise
            raise TemplateError(f"{where}: {name}: {e}", True) from None
        except (TypeError, AttributeError) as e:
            raise TemplateError(f"{where}: wrong arguments for {name}: {e}", True) from None

    def pipeline(self, pl, dot, scopes, where):
        _, decl, cmds = pl
        val = None
        for i, cmd in enumerate(cmds):
            final = (val,) if i > 0 else None
            head = cmd[0]
            if head[0] == "ident":
                val = self.call(head[1], cmd[1:], dot, scopes, where, final)
            else:
                if len(cmd) > 1 or final:
                    raise TemplateError(f"{where}: can't give argument to non-function")
                val = self.operand(head, dot, scopes, where)
        if decl:
            how, names = decl
            if how == "decl":
                scopes[-1][names[-1]] = val
            else:
                self.lookup_var(scopes, names[-1], where)[names[-1]] = val
        return val

    def exec_list(self, nodes, dot, scopes, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                v = self.pipeline(node[1], dot, scopes, node[2])
                if node[1][1] is None:
                    out.append(go_str(v))
            elif kind == "if":
                _, p, body, els, where = node
                v = self.pipeline(p, dot, scopes, where)
                self.exec_list(body if truthy(v) else els, dot, scopes + [{}], out)
            elif kind == "with":
                _, p, body, els, where = node
                v = self.pipeline(p, dot, scopes, where)
                if truthy(v):
                    self.exec_list(body, v, scopes + [{}], out)
                else:
                    self.exec_list(els, dot, scopes + [{}], out)
            elif kind == "range":
                _, p, body, els, where = node
                decl = p[1]
                v = self.pipeline(("pipeline", None, p[2]), dot, scopes, where)
                if isinstance(v, dict):
                    pairs = [(k, v[k]) for k in sorted(v)]
                elif isinstance(v, list):
                    pairs = list(enumerate(v))
                elif v is None:
                    pairs = []
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    pairs = [(i, i) for i in range(int(v))]
                else:
                    raise TemplateError(f"{where}: range can't iterate over {go_str(v)}")
                if not pairs:
                    self.exec_list(els, dot, scopes + [{}], out)
                for k, x in pairs:
                    s = {}
                    if decl:
                        names = decl[1]
                        if len(names) == 1:
                            s[names[0]] = x
                        else:
                            s[names[0]], s[names[1]] = k, x
                    self.exec_list(body, x, scopes + [s], out)


# ---------------------------------------------------------------------------------------------

def deep_merge(base, over):
    for k, v in over.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(description="render a chart like `helm template` (subset)")
    ap.add_argument("chart")
    ap.add_argument("-f", "--values", action="append", default=[])
    ap.add_argument("--name", default="release-name")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--notes", action="store_true")
    a = ap.parse_args(argv)

    chart_dir = a.chart.rstrip("/")
    with open(os.path.join(chart_dir, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    with open(os.path.join(chart_dir, "values.yaml")) as f:
        values = yaml.safe_load(f) or {}
    for path in a.values:
        with open(path) as f:
            deep_merge(values, yaml.safe_load(f) or {})
    values = to_json_numbers(values)

    cname = chart["name"]
    tdir = os.path.join(chart_dir, "templates")
    defines = {}
    files = {}
    for root, _, names in os.walk(tdir):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, chart_dir)
            tname = f"{cname}/{rel}"
            with open(p) as f:
                src = f.read()
            nodes = parse(src, tname, defines)
            defines[tname] = nodes
            files[tname] = (n, nodes)

    top = {
        "Values": values,
        "Release": {
            "Name": a.name,
            "Namespace": a.namespace,
            "Service": "Helm",
            "IsInstall": True,
            "IsUpgrade": False,
            "Revision": 1,
        },
        "Chart": {k[:1].upper() + k[1:]: v for k, v in chart.items()},
        "Capabilities": {"KubeVersion": {"Version": "v1.31.0", "Major": "1", "Minor": "31"}},
    }
    eng = Engine(defines)
    out = []
    for tname in sorted(files):
        base, nodes = files[tname]
        if base.startswith("_"):
            continue
        if (base == "NOTES.txt") != a.notes:
            continue
        data = dict(top)
        data["Template"] = {"Name": tname, "BasePath": f"{cname}/templates"}
        try:
            text = eng.run(nodes, data)
        except TemplateError as e:
            print(f"Error: {tname}: {e}", file=sys.stderr)
            return 1
        if a.notes:
            out.append(text)
            continue
        for doc in re.split(r"(?m)^---[ \t]*$", text):
            if doc.strip() == "" or all(
                l.strip() == "" or l.lstrip().startswith("#") for l in doc.splitlines()
            ):
                continue
            out.append(f"---\n# Source: {tname}\n{doc.strip(chr(10))}\n")
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
