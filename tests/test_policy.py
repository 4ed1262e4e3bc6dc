"""Source rules: what matches, first match wins, the default, and the explanation."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import CIMultiDict

from seadragon_proxy.netaddr import parse_address
from seadragon_proxy.policy import Policy, RequestFacts
from seadragon_proxy.settings import parse_settings

RULES = {
    "sources": [
        {
            "name": "coding",
            "priority": 0,
            "match": {"user_agent": ["*Continue*", "*aider*"], "whitelisted": True},
        },
        {"name": "chat", "priority": 5, "match": {"origin": "https://chat.example.com"}},
        {"name": "scripts", "priority": 8, "match": {"header": {"X-Seadragon-Source": "script"}}},
        {"name": "office", "priority": 6, "match": {"client_ip": ["10.0.0.0/8"], "path": "/api/*"}},
        {"name": "big", "priority": 9, "match": {"model": "llama3:70b*"}},
        {"name": "direct_api", "priority": 10, "require_whitelist": True},
    ],
    "default_source": "direct_api",
}


def policy() -> Policy:
    return parse_settings(RULES, file="t.yaml", base=Path("."), environ={}).policy


def facts(
    ip: str = "127.0.0.1",
    path: str = "/api/chat",
    headers: dict[str, str] | None = None,
    model: str | None = None,
    whitelisted: bool = True,
) -> RequestFacts:
    return RequestFacts(parse_address(ip), path, CIMultiDict(headers or {}), model, whitelisted)


@pytest.mark.parametrize(
    ("request_facts", "source"),
    [
        (facts(headers={"User-Agent": "Continue/0.9 (vscode)"}), "coding"),
        (facts(headers={"User-Agent": "python-requests AIDER-chat"}), "coding"),  # any case
        (facts(headers={"User-Agent": "Continue/0.9"}, whitelisted=False, model="x"), "direct_api"),
        (facts(headers={"Origin": "https://chat.example.com"}), "chat"),
        (facts(headers={"Origin": "https://chat.example.com.evil.net"}), "direct_api"),
        (facts(headers={"x-seadragon-source": "SCRIPT"}), "scripts"),  # header names too
        (facts(headers={"X-Seadragon-Source": "scripts"}), "direct_api"),  # whole-value glob
        (facts(ip="10.2.3.4", path="/api/generate"), "office"),
        (facts(ip="10.2.3.4", path="/v1/chat/completions"), "direct_api"),  # both keys must hold
        (facts(model="llama3:70b-instruct"), "big"),
        (facts(model="llama3.2:1b"), "direct_api"),
        (facts(), "direct_api"),
    ],
)
def test_classify(request_facts: RequestFacts, source: str) -> None:
    assert policy().classify(request_facts).source.name == source


def test_first_match_wins() -> None:
    decision = policy().classify(
        facts(headers={"User-Agent": "aider", "Origin": "https://chat.example.com"})
    )
    assert decision.source.name == "coding" and decision.rule_index == 0


def test_explanation_names_the_rule_and_the_reasons() -> None:
    decision = policy().classify(facts(headers={"User-Agent": "Continue/0.9"}))
    text = decision.explain()
    assert "sources[0] 'coding'" in text
    assert "user_agent 'Continue/0.9' matches '*Continue*'" in text
    assert "is on the whitelist" in text


def test_rule_without_match_matches_everything() -> None:
    decision = policy().classify(facts(model="nothing-special"))
    assert decision.source.name == "direct_api"
    assert "matches everything" in decision.explain()


def test_default_when_nothing_matches() -> None:
    rules = {
        "sources": [{"name": "a", "priority": 1, "match": {"path": "/x"}}],
        "default_source": "a",
    }
    decision = parse_settings(rules, file="t", base=Path("."), environ={}).policy.classify(facts())
    assert decision.rule_index is None
    assert "default_source 'a'" in decision.explain()
