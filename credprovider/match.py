"""The kubelet's registry pattern matching, reproduced rule for rule.

The kubelet decides whether a pattern (a `matchImages` entry, or a key of our response's
`auth` map) applies to an image with URLsMatchStr in pkg/credentialprovider/keyring.go:

- both strings are parsed by Go's net/url as "https://" + s (so `?` starts a query, `#`
  a fragment and `user@` is dropped: they are not globs or host characters);
- the host is split by net.SplitHostPort; when that fails (no port, or a shape it
  rejects) the whole host is the name and the port is "";
- ports must be equal strings, the names must have the same number of dot-separated
  labels, the pattern's path must be a plain string prefix of the image's path, and
  each label must match with Go's filepath.Match (`*`, `?`, `[...]`, `\\`; a malformed
  glob is an error).

Every error the kubelet meets on the way counts as "no match" there (it ignores the
error), so `matches` returns False for them; `check_pattern` raises them instead, for
config validation. Go's behaviour is that of the Go release kubelet 1.34/1.35 ships
with (1.24/1.25, which reject `[` anywhere but at the start of a host). Only the
standard library's plain string operations are used: `re` alone costs more start-up
time than this whole module.
"""

from __future__ import annotations

_CTL = frozenset(chr(c) for c in range(0x20)) | {"\x7f"}
_HEX = frozenset("0123456789abcdefABCDEF")
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
# Go's shouldEscape(c, encodeHost) is false for these ASCII characters (plus `%`,
# which unescape handles): any other ASCII byte in a host is an error.
_HOST_OK = _ALNUM | frozenset("-_.~!$&'()*+,;=:[]<>\"")
_USERINFO_OK = _ALNUM | frozenset("-._:~!$&'()*+,;=%@")
_SEPARATOR = "/"


class PatternError(ValueError):
    """A string Go's url.Parse or filepath.Match would reject."""


def _unescape(text: str, *, host: bool) -> str:
    """Go's url unescape in host or path mode; bytes Go would keep raw stay raw."""
    if "%" not in text:
        if host:
            for char in text:
                if char < "\x80" and char not in _HOST_OK:
                    raise PatternError(f"invalid character {char!r} in host name")
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%":
            digits = text[i + 1 : i + 3]
            if len(digits) < 2 or not set(digits) <= _HEX:
                raise PatternError(f"invalid URL escape {text[i : i + 3]!r}")
            value = int(digits, 16)
            # Hosts may not %-encode ASCII (except %25, the escaped `%` itself).
            if host and value < 0x80 and digits != "25":
                raise PatternError(f"invalid URL escape {text[i : i + 3]!r}")
            out.append(value)
            i += 3
            continue
        if host and char < "\x80" and char not in _HOST_OK:
            raise PatternError(f"invalid character {char!r} in host name")
        out += char.encode("utf-8", "surrogateescape")
        i += 1
    return out.decode("utf-8", "surrogateescape")


def _valid_optional_port(colon_port: str) -> bool:
    if colon_port == "":
        return True
    return colon_port[0] == ":" and all("0" <= c <= "9" for c in colon_port[1:])


def _parse_host(host: str) -> str:
    bracket = host.rfind("[")
    if bracket > 0:
        raise PatternError("invalid IP-literal")
    if bracket == 0:
        close = host.rfind("]")
        if close < 0:
            raise PatternError("missing ']' in host")
        if not _valid_optional_port(host[close + 1 :]):
            raise PatternError(f"invalid port {host[close + 1 :]!r} after host")
        # Go unescapes a zone (after "%25") a little more leniently; zones have no
        # business in a registry pattern, so host rules for the whole literal will do.
        address = _unescape(host[1:close], host=True)
        _check_ipv6(address)
        return "[" + address + "]" + host[close + 1 :]
    colon = host.rfind(":")
    if colon >= 0 and not _valid_optional_port(host[colon:]):
        raise PatternError(f"invalid port {host[colon:]!r} after host")
    return _unescape(host, host=True)


def _check_ipv6(address: str) -> None:
    # Only a bracketed host needs this, so the import stays off the common path.
    import ipaddress  # noqa: PLC0415

    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise PatternError("invalid IP-literal") from None


def parse(text: str) -> tuple[str, str]:
    """(host, path) of "https://" + text as Go's url.Parse sees them."""
    text, _, fragment = text.partition("#")
    if any(c in _CTL for c in text):
        raise PatternError("invalid control character in URL")
    # A lone trailing "?" is an empty query; otherwise the query starts at the first "?".
    text = text[:-1] if text.endswith("?") and text.count("?") == 1 else text.partition("?")[0]
    slash = text.find("/")
    authority, path = (text, "") if slash < 0 else (text[:slash], text[slash:])
    at = authority.rfind("@")
    host = _parse_host(authority[at + 1 :])
    if at >= 0:
        userinfo = authority[:at]
        if not set(userinfo) <= _USERINFO_OK:
            raise PatternError("invalid userinfo")
        _unescape(userinfo, host=False)
    path = _unescape(path, host=False)
    _unescape(fragment, host=False)
    return host, path


def split_host(host: str) -> tuple[list[str], str]:
    """Dot-separated labels and port, as the kubelet gets them from net.SplitHostPort."""
    name, port = _split_host_port(host)
    if name is None:
        name, port = host, ""
    return name.split("."), port


def _split_host_port(hostport: str) -> tuple[str | None, str]:
    """Go's net.SplitHostPort; (None, "") where it returns an error."""
    colon = hostport.rfind(":")
    if colon < 0:
        return None, ""
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0 or close + 1 != colon:
            return None, ""
        name, first, last = hostport[1:close], 1, close + 1
    else:
        name, first, last = hostport[:colon], 0, 0
        if ":" in name:
            return None, ""
    if "[" in hostport[first:] or "]" in hostport[last:]:
        return None, ""
    return name, hostport[colon + 1 :]


# A glob token: kind ("*", "?", "lit" or "class"), its character (lit), whether the
# class is negated, and the class's (low, high) ranges.
_Token = tuple[str, str, bool, tuple[tuple[str, str], ...]]


def _glob_tokens(pattern: str) -> list[_Token]:
    """Go filepath.Match syntax as tokens; PatternError where Go says ErrBadPattern."""
    tokens: list[_Token] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char in "*?":
            tokens.append((char, "", False, ()))
        elif char == "\\":
            if i + 1 == len(pattern):
                raise PatternError(f"bad glob {pattern!r}: trailing backslash")
            i += 1
            tokens.append(("lit", pattern[i], False, ()))
        elif char == "[":
            i, ranges, negated = _glob_class(pattern, i + 1)
            tokens.append(("class", "", negated, tuple(ranges)))
            continue
        else:
            tokens.append(("lit", char, False, ()))
        i += 1
    return tokens


def _glob_class(pattern: str, i: int) -> tuple[int, list[tuple[str, str]], bool]:
    """Parse a class body after `[`; return the index after `]`, the ranges and negation."""
    negated = i < len(pattern) and pattern[i] == "^"
    i += negated
    ranges: list[tuple[str, str]] = []
    while not (ranges and i < len(pattern) and pattern[i] == "]"):
        low, i = _class_char(pattern, i)
        high = low
        if pattern[i] == "-":
            high, i = _class_char(pattern, i + 1)
        ranges.append((low, high))
    return i + 1, ranges, negated


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    """Go's getEsc: one (possibly escaped) class character, never the last of the pattern."""
    if i >= len(pattern) or pattern[i] in "-]":
        raise PatternError(f"bad glob {pattern!r}: malformed character class")
    if pattern[i] == "\\":
        i += 1
    if i + 1 >= len(pattern):
        raise PatternError(f"bad glob {pattern!r}: unterminated character class")
    return pattern[i], i + 1


def _token_matches(token: _Token, char: str) -> bool:
    kind, literal, negated, ranges = token
    if kind == "lit":
        return literal == char
    if kind == "?":
        return char != _SEPARATOR
    return any(low <= char <= high for low, high in ranges) != negated


def glob_match(pattern: str, name: str) -> bool:
    """Go's filepath.Match(pattern, name) on Unix; PatternError for a malformed pattern."""
    tokens = _glob_tokens(pattern)
    t = n = 0
    star_t = star_n = -1  # where the last `*` began, to widen it on a mismatch
    while n < len(name):
        if t < len(tokens) and tokens[t][0] == "*":
            star_t, star_n = t, n
            t += 1
        elif t < len(tokens) and _token_matches(tokens[t], name[n]):
            t += 1
            n += 1
        elif star_t >= 0 and name[star_n] != _SEPARATOR:
            star_n += 1
            t, n = star_t + 1, star_n
        else:
            return False
    return all(token[0] == "*" for token in tokens[t:])


def check_pattern(pattern: str) -> None:
    """Raise PatternError where the kubelet could never match the pattern."""
    host, _ = parse(pattern)
    for label in split_host(host)[0]:
        _glob_tokens(label)


def urls_match(pattern: str, image: str) -> bool:
    """URLsMatchStr(pattern, image); PatternError where Go returns an error."""
    pattern_host, pattern_path = parse(pattern)
    image_host, image_path = parse(image)
    pattern_labels, pattern_port = split_host(pattern_host)
    image_labels, image_port = split_host(image_host)
    if pattern_port != image_port or len(pattern_labels) != len(image_labels):
        return False
    if not image_path.startswith(pattern_path):
        return False
    return all(glob_match(p, image_labels[k]) for k, p in enumerate(pattern_labels))


def matches(pattern: str, image: str) -> bool:
    """Whether the kubelet would apply `pattern` to `image` (its errors mean no)."""
    try:
        return urls_match(pattern, image)
    except PatternError:
        return False


def narrower_than_registry(pattern: str, image: str) -> bool:
    """Whether `pattern` applies to some images of `image`'s registry but maybe not all.

    True when its host and port match the registry and it has a path: then an answer
    for one image of the registry is not the answer for all of them.
    """
    try:
        path = parse(pattern)[1]
    except PatternError:
        return False
    return bool(path) and matches(pattern.partition("/")[0], image.partition("/")[0])


def is_default_registry(image: str) -> bool:
    """The kubelet's isDefaultRegistryMatch: whether `image` is pulled from Docker Hub.

    Credentials keyed "index.docker.io" apply to such images when no key matches them.
    """
    first, slash, _ = image.partition("/")
    if not first:
        return False
    if not slash or first in ("docker.io", "index.docker.io"):
        return True
    return "." not in first and ":" not in first
