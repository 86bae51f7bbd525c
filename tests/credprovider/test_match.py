"""The kubelet's URLsMatchStr rules, case by case (pkg/credentialprovider/keyring.go with
Go's net/url, net.SplitHostPort and path/filepath.Match), then properties."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credprovider.match import PatternError, check_pattern, glob_match, matches, parse, split_host

# (pattern, image, the kubelet's answer, why)
KUBELET_CASES = [
    ("registry.io", "registry.io/app", True, "plain host"),
    ("registry.io", "registry.io", True, "no path on either side"),
    ("*.registry.io", "a.registry.io/app", True, "glob label"),
    ("*.registry.io", "registry.io/app", False, "label counts differ"),
    ("*.registry.io", "a.b.registry.io/app", False, "a glob matches one label only"),
    ("*.io", "k8s.registry.io/x", False, "*.io does not match *.k8s.io"),
    ("k8s.*.io", "k8s.registry.io/x", True, "glob in a middle label"),
    ("k8s.*", "k8s.io/x", True, "glob top-level label"),
    ("app*.k8s.io", "app1.k8s.io/x", True, "partial label glob"),
    ("app*.k8s.io", "ap.k8s.io/x", False, "partial label glob, too short"),
    ("*.*.registry.io", "a.b.registry.io/x", True, "two glob labels"),
    ("*", "localhost/x", True, "one label, one glob"),
    ("*", "registry.io/x", False, "one glob is one label"),
    ("Registry.io", "registry.io/x", False, "case-sensitive"),
    ("registry.io.", "registry.io/x", False, "trailing dot adds an empty label"),
    ("registry.io:8080/path", "registry.io:8080/path/app", True, "port and path"),
    ("registry.io:8080/path", "registry.io/path/app", False, "pattern port, image none"),
    ("registry.io", "registry.io:8080/app", False, "image port, pattern none"),
    ("registry.io:8080", "registry.io:08080/app", False, "ports compare as strings"),
    ("registry.io:", "registry.io/app", True, "empty port is no port"),
    ("registry.io:*", "registry.io:5000/x", False, "no globs in ports (parse error)"),
    ("registry.io/team", "registry.io/teammate/app", True, "path is a plain string prefix"),
    ("registry.io/team/", "registry.io/team", False, "longer path is no prefix"),
    ("registry.io/team", "registry.io/other", False, "other path"),
    ("registry.io/*", "registry.io/app", False, "no globs in paths"),
    ("registry.io/*", "registry.io/*/x", True, "a path `*` is literal"),
    ("registry.io/a%2Fb", "registry.io/a/b/c", True, "paths compare unescaped"),
    ("registry.io/%zz", "registry.io/%zz", False, "bad escape: parse error"),
    ("reg?.io", "reg/x", True, "`?` starts the query: the host is `reg`"),
    ("reg?.io", "reg1.io/x", False, "`?` is never a glob in a host"),
    ("reg#frag", "reg/anything", True, "`#` starts the fragment"),
    ("user@registry.io", "registry.io/x", True, "userinfo is dropped"),
    ("reg[0-9].io", "reg1.io/x", False, "`[` inside a host: invalid IP-literal"),
    ("[::1]:5000", "[::1]:5000/x", True, "IPv6 literal with port"),
    ("[::1]", "[::1]/x", False, "IPv6 literal without port is a glob class"),
    ("[1.2.3.4]:5000", "[1.2.3.4]:5000/x", False, "IPv4 in brackets is refused"),
    ("127.0.0.1:5000", "127.0.0.1:5000/x", True, "IPv4 host"),
    ("*.0.0.1:5000", "127.0.0.1:5000/x", True, "IPv4 labels glob like names"),
    ("reg istry.io", "reg istry.io/x", False, "space in host: parse error"),
    ("a\\*.io", "a*.io/x", False, "backslash in host: parse error"),
    ("caf%C3%A9.io", "café.io/x", True, "non-ASCII escapes decode in hosts"),
    ("caf%41.io", "cafA.io/x", False, "ASCII escapes are refused in hosts"),
    ("reg\n.io", "reg\n.io/x", False, "control character: parse error"),
    ("", "", True, "empty matches empty"),
    ("", "registry.io/x", False, "empty is one empty label"),
    ("*", "*/x", True, "a glob matches a literal star"),
]


@pytest.mark.parametrize(
    ("pattern", "image", "expected"),
    [case[:3] for case in KUBELET_CASES],
    ids=[case[3] for case in KUBELET_CASES],
)
def test_matches_like_the_kubelet(pattern: str, image: str, expected: bool) -> None:
    assert matches(pattern, image) is expected


# Go's filepath.Match on Unix: (pattern, name, result); None is ErrBadPattern.
GLOB_CASES = [
    ("a*b", "axxb", True),
    ("a*b", "axxc", False),
    ("a*", "a/b", False),
    ("*", "", True),
    ("*x", "x", True),
    ("a?c", "abc", True),
    ("a?c", "a/c", False),
    ("a?c", "aéc", True),
    ("[a-c]", "b", True),
    ("[^a-c]", "b", False),
    ("[^a-c]", "d", True),
    ("[a-cx]", "x", True),
    ("[\\]]", "]", True),
    ("[/]", "/", True),
    ("\\*", "*", True),
    ("\\*", "a", False),
    ("a]", "a]", True),
    ("*a*b*", "xaybz", True),
    ("*a*b", "xaybz", False),
    ("[", "a", None),
    ("\\", "a", None),
    ("[a-", "a", None),
    ("[]a]", "a", None),
    ("[^]", "a", None),
    ("[-a]", "a", None),
    ("x[a", "y", None),
    ("[a-b-c]", "a", None),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), GLOB_CASES)
def test_glob_like_go_filepath_match(pattern: str, name: str, expected: bool | None) -> None:
    if expected is None:
        with pytest.raises(PatternError):
            glob_match(pattern, name)
    else:
        assert glob_match(pattern, name) is expected


@pytest.mark.parametrize(
    ("host", "labels", "port"),
    [
        ("registry.io:5000", ["registry", "io"], "5000"),
        ("registry.io", ["registry", "io"], ""),
        ("registry.io:", ["registry", "io"], ""),
        ("[::1]:5000", ["::1"], "5000"),
        ("[::1]", ["[::1]"], ""),
        ("a:b:c", ["a:b:c"], ""),
        ("[::1]x:5", ["[::1]x:5"], ""),
    ],
)
def test_split_host_like_net_split_host_port(host: str, labels: list[str], port: str) -> None:
    assert split_host(host) == (labels, port)


@pytest.mark.parametrize(
    "pattern",
    ["reg[0-9].io", "registry.io:x", "reg istry.io", "[::1", "[1.2.3.4]", "a/%zz", "\x00", "a.\\"],
)
def test_check_pattern_refuses_what_never_matches(pattern: str) -> None:
    with pytest.raises(PatternError):
        check_pattern(pattern)


def test_parse_keeps_raw_non_ascii_and_splits_query_and_fragment() -> None:
    assert parse("héllo.io/p?q=1#f") == ("héllo.io", "/p")
    assert parse("host?") == ("host", "")


# Properties. Without `[`, `\\` and `/`, Go's glob is fnmatch's: an independent oracle.
simple_globs = st.text(alphabet="ab*?.-", max_size=8)
simple_names = st.text(alphabet="ab.-", max_size=8)


@given(simple_globs, simple_names)
def test_glob_agrees_with_fnmatch_on_simple_patterns(pattern: str, name: str) -> None:
    assert glob_match(pattern, name) == fnmatch.fnmatchcase(name, pattern)


label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)
hosts = st.lists(label, min_size=1, max_size=4).map(".".join)
ports = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
paths = st.lists(label, max_size=3).map(lambda parts: "".join("/" + p for p in parts))


@given(hosts, ports, paths, paths)
def test_registry_images_match_their_own_prefix(host: str, port: str, path: str, more: str) -> None:
    assert matches(host + port + path, host + port + path + more)


@given(hosts, ports, paths, st.data())
def test_any_label_can_be_a_star(host: str, port: str, path: str, data: st.DataObject) -> None:
    labels = host.split(".")
    star = data.draw(st.integers(0, len(labels) - 1))
    pattern = ".".join("*" if i == star else part for i, part in enumerate(labels))
    assert matches(pattern + port, host + port + path)
    assert not matches("x." + pattern + port, host + port + path)


@given(hosts, ports, st.integers(1, 65535), paths)
def test_a_different_port_never_matches(host: str, port: str, other: int, path: str) -> None:
    if port != f":{other}":
        assert not matches(f"{host}:{other}", host + port + path)


@given(st.text(max_size=30), st.text(max_size=30))
def test_matches_never_raises(pattern: str, image: str) -> None:
    assert matches(pattern, image) in (True, False)
