"""The pure parts of the notifications (escrow/notifications/, escrow/service/overdue.py): an
event's identity across replicas, its body and chat text, the signature and README's check of
it, which events a receiver hears of, its config and secret, and the retry policy."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from escrow.audit import AuditEvent
from escrow.core.errors import ConfigError
from escrow.core.states import Decision, LockState, NodeStatus, RequestState
from escrow.core.timestamps import timestamp
from escrow.notifications import body, events, retry, signing
from escrow.notifications.events import Event, EventKind
from escrow.notifications.receivers import Receiver, open_receivers
from escrow.notifications.settings import WebhookSettings, parse
from escrow.service import overdue
from escrow.store import HeartbeatRecord, NodeRecord, RequestRecord
from lab.commands import readme_blocks

NOW = datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC)
SECRET = b"0123456789abcdef0123456789abcdef"
HOSTILE = ["<!channel> *x* @here", "<!here|here>", "@channel", "*urgent* _now_ ~x~",
           "`rm -rf /`", "<https://evil.example|escrow approve r-other>", "a&lt;b",
           "x\x1b[2K\rmanager-2", "\u202emgr"]


def request(hostname: str = "manager-1", request_id: str = "r-abc",
            expires: datetime = NOW + timedelta(minutes=15),
            state: RequestState = RequestState.PENDING) -> RequestRecord:
    return RequestRecord(request_id, "c" * 25, "n" * 25, hostname, "unknown", "192.0.2.1",
                         "pem", b"k", "1", timestamp(NOW), timestamp(expires), state)


def node(status: NodeStatus = NodeStatus.ACTIVE, hostname: str = "manager-1",
         node_id: str = "n" * 25) -> NodeRecord:
    return NodeRecord("c" * 25, node_id, "pem", hostname, timestamp(NOW), status)


def beat(last: datetime, boot: str = "b-1", goodbye: bool = False,
         interval: int = 30) -> HeartbeatRecord:
    return HeartbeatRecord("c" * 25, "n" * 25, boot, timestamp(last - timedelta(hours=1)),
                           timestamp(last), LockState.UNLOCKED, "1", "0.1.0", 3600, interval,
                           goodbye, "192.0.2.1")


def every_kind(name: str) -> list[Event]:
    """One event of each kind, ``name`` wherever a node or a custodian chooses the text."""
    asking = request(name)
    return [events.requested(asking, 1, NOW),
            events.decided(asking, Decision.APPROVE, name, "", 1, 1, NOW),
            events.decided(asking, Decision.DENY, "alice", name, 0, 2, NOW),
            events.expired(asking, 1), events.expired(asking, 0),
            events.unlocked(asking, 3, NOW),
            events.refused("unseal", "revoked", f"node {name} is revoked", "c" * 25, "n" * 25,
                           name, "", NOW),
            events.from_alert(AuditEvent("node.clone_suspected", "escrow", "c" * 25,
                                         {"node_id": "n" * 25, "hostname": name,
                                          "alongside": [{"source": name}]}), NOW),
            events.node_unreachable(node(hostname=name), beat(NOW), NOW),
            events.node_unreachable(node(hostname=name), beat(NOW, goodbye=True), NOW),
            events.from_alert(AuditEvent("key.versions_full", "node:n", "c" * 25,
                                         {"retained": 10, "note": name}), NOW)]


# -- identity -------------------------------------------------------------------------------

def test_two_replicas_seeing_the_same_expiry_make_one_id_and_one_claim_key() -> None:
    mine = events.expired(request(), 1)
    theirs = events.expired(request(), 2)  # read a moment later, one approval since
    assert (mine.id, mine.claim_key) == (theirs.id, theirs.claim_key)
    assert events.expired(request(request_id="r-other"), 1).id != mine.id
    assert events.requested(request(), 1, NOW).id != mine.id  # another kind, another event


def test_a_silence_is_one_event_whenever_a_replica_sees_it_and_a_new_beat_makes_another(
) -> None:
    last = beat(NOW)
    seen = [events.node_unreachable(node(), last, NOW + timedelta(seconds=s)) for s in (0, 7)]
    assert seen[0].id == seen[1].id
    after_next_beat = events.node_unreachable(node(), beat(NOW + timedelta(seconds=30)), NOW)
    assert after_next_beat.id != seen[0].id


def test_a_node_refused_over_and_over_is_told_once_per_window() -> None:
    def refusal(at: datetime, reason: str = "revoked") -> str:
        return events.refused("unseal", reason, "m", "c", "n", "h", "", at).id

    start = datetime.fromtimestamp(events.REPEAT_SECONDS * 2_000_000, UTC)
    assert refusal(start) == refusal(start + timedelta(seconds=events.REPEAT_SECONDS - 1))
    assert refusal(start) != refusal(start + timedelta(seconds=events.REPEAT_SECONDS))
    assert refusal(start) != refusal(start, "rate_limited")


def test_each_approval_is_an_event_of_its_own() -> None:
    asking = request()
    alice = events.decided(asking, Decision.APPROVE, "alice", "", 1, 1, NOW)
    bob = events.decided(asking, Decision.APPROVE, "bob", "", 2, 0, NOW)
    assert alice.id != bob.id
    assert (alice.kind, bob.details["needed"]) == (EventKind.APPROVED, 0)


# -- body -----------------------------------------------------------------------------------

def outside_code_spans(text: str) -> str:
    return "".join(text.split("`")[0::2])


@pytest.mark.parametrize("name", HOSTILE)
def test_every_event_keeps_node_chosen_text_out_of_chat_markup(name: str) -> None:
    for event in every_kind(name):
        text = body.text(event)
        assert text.count("`") % 2 == 0, text  # every span closed: nothing leaks out of one
        assert not {"<", ">", "*", "_", "~", "@"} & set(outside_code_spans(text)), text
        assert "<" not in text, text  # no <!channel>, <@U1> or <url|label> inside either
        assert "@channel" not in text
        assert "@here" not in text
        assert "\x1b" not in text
        assert "\r" not in text
        assert "\u202e" not in text


def test_the_body_carries_the_values_with_control_characters_escaped() -> None:
    event = events.unlocked(request("x\x1b[2K\rmanager-2\u202e"), 3, NOW)
    assert body.body(event)["hostname"] == "x\\x1b[2K\\x0dmanager-2\\u202e"
    encoded = body.encoded(event)
    assert encoded.isascii()
    assert json.loads(encoded) == body.body(event)


COMMON = ["cluster_id", "event", "hostname", "id", "node_id", "request_id", "text", "time"]


@pytest.mark.parametrize(("event", "own"), [
    (events.requested(request(), 2, NOW), ["expires_at", "needed"]),
    (events.decided(request(), Decision.APPROVE, "alice", "", 1, 1, NOW),
     ["approvals", "custodian", "needed"]),
    (events.decided(request(), Decision.DENY, "alice", "not planned", 0, 1, NOW),
     ["custodian", "reason"]),
    (events.expired(request(), 1), ["expires_at", "needed"]),
    (events.unlocked(request(), 3, NOW), ["version"]),
    (events.refused("unseal", "revoked", "m", "c", "n", "h", "", NOW),
     ["action", "message", "reason"]),
    (events.node_unreachable(node(), beat(NOW), NOW),
     ["boot_id", "goodbye", "interval_seconds", "last_seen"]),
    (events.from_alert(AuditEvent("node.clone_suspected", "escrow", "c", {"node_id": "n"}), NOW),
     ["alert", "details"]),
    (events.from_alert(AuditEvent("key.unconfirmed", "escrow", "c", {"request_id": "r"}), NOW),
     ["alert", "details"]),
], ids=lambda value: value.kind.value if isinstance(value, Event) else "")
def test_every_body_has_the_common_fields_and_its_kinds_own(event: Event,
                                                            own: list[str]) -> None:
    sent = body.body(event)
    assert sorted(sent) == sorted(COMMON + own)
    assert (sent["event"], sent["id"]) == (event.kind.value, event.id)


def test_chat_texts_read_as_sentences_for_a_plain_hostname() -> None:
    texts = {e.kind: body.text(e) for e in every_kind("manager-1")}
    assert texts[EventKind.DENIED] == ("`alice` denied the unseal of swarm manager `manager-1` "
                                       "(`r-abc`): `manager-1`")
    assert texts[EventKind.UNLOCKED] == ("Swarm manager `manager-1` unlocked with key version "
                                         "3 (`r-abc`)")
    assert texts[EventKind.NODE_UNREACHABLE].endswith("(its agent had said goodbye)")


def test_an_expiry_says_whether_it_waited_for_custodians() -> None:
    assert body.text(events.expired(request(), 2)).endswith(
        "expired waiting for 2 custodian approval(s)")
    assert body.text(events.expired(request(), 0)).endswith("expired without a reported unlock")


# -- signature ------------------------------------------------------------------------------

def readme_verify() -> Callable[[bytes, bytes, str], bool]:
    [code] = readme_blocks("Notifications", 3, language="python")
    namespace: dict[str, object] = {}
    exec("\n".join(code), namespace)  # noqa: S102 (README's own example, run as a receiver would)
    verify = namespace["verify"]
    assert callable(verify)
    return verify


def test_the_signature_is_hmac_sha256_of_the_time_a_dot_and_the_body() -> None:
    sent = b'{"event":"requested"}'
    mac = hmac.new(SECRET, b"1764580443." + sent, hashlib.sha256).hexdigest()
    assert signing.signature(SECRET, sent, 1764580443) == f"t=1764580443,v1={mac}"
    headers = signing.headers(SECRET, sent, 1764580443, "ev-1", EventKind.REQUESTED)
    assert headers == {"Content-Type": "application/json", signing.ID_HEADER: "ev-1",
                       signing.EVENT_HEADER: "requested",
                       signing.SIGNATURE_HEADER: f"t=1764580443,v1={mac}"}


def test_readmes_check_takes_a_fresh_signature_and_nothing_forged_stale_or_garbled() -> None:
    verify = readme_verify()
    sent = body.encoded(events.requested(request(), 1, NOW))
    now = int(datetime.now(UTC).timestamp())
    assert verify(SECRET, sent, signing.signature(SECRET, sent, now))
    assert not verify(SECRET, sent + b" ", signing.signature(SECRET, sent, now))
    assert not verify(b"another secret of thirty-two chars", sent,
                      signing.signature(SECRET, sent, now))
    assert not verify(SECRET, sent, signing.signature(SECRET, sent, now - 3600))
    for garbled in ("", "t=,v1=", "v1=00", f"t={now}", "t=x,v1=00", f"t={now},v1=\u00e9"):
        assert not verify(SECRET, sent, garbled)


# -- receivers ------------------------------------------------------------------------------

def webhooks(text: str, data_dir: Path = Path("/data")) -> tuple[WebhookSettings, ...]:
    import tomllib  # noqa: PLC0415

    return parse(tomllib.loads(text).get("webhooks"), "escrow.toml", data_dir)


def test_a_receiver_hears_of_every_event_unless_it_names_some() -> None:
    every, some = webhooks('''
        [[webhooks]]
        name = "oncall"
        url = "https://chat.example/hooks/T0/B0/XXXX"
        secret_file = "oncall.secret"
        [[webhooks]]
        name = "chat"
        url = "http://127.0.0.1:9000/hook"
        events = ["unlocked", "expired"]
        secret_credential = "webhook-chat"
        ''')
    assert every.events == frozenset(EventKind)
    assert some.events == {EventKind.UNLOCKED, EventKind.EXPIRED}
    assert (every.secret_file, some.secret_file) == (Path("/data/oncall.secret"), None)
    assert some.secret_credential == "webhook-chat"
    chat = Receiver("chat", some.url, some.events, SECRET)
    assert [k for k in EventKind if chat.wants(k)] == [EventKind.EXPIRED, EventKind.UNLOCKED]


TOKEN_URL = "https://chat.example/hooks/T0/B0/sekrit-token"


@pytest.mark.parametrize(("table", "message"), [
    ('url = "https://x.example/"\nsecret_file = "s"', "name must be"),
    ('name = "a b"\nurl = "https://x.example/"\nsecret_file = "s"', "name must be"),
    ('name = "o"\nsecret_file = "s"', "url must be an http:// or https:// URL"),
    ('name = "o"\nurl = "ftp://x.example/"\nsecret_file = "s"', "url must be"),
    ('name = "o"\nurl = "https://"\nsecret_file = "s"', "url must be"),
    ('name = "o"\nurl = "https://x.example:99999/"\nsecret_file = "s"', "url must be"),
    ('name = "o"\nurl = "https://x.example/"', "give one of secret_file and secret_credential"),
    ('name = "o"\nurl = "https://x.example/"\nsecret_file = "s"\nsecret_credential = "c"',
     "give one of"),
    ('name = "o"\nurl = "https://x.example/"\nsecret_credential = "../hsm-pin"',
     "secret_credential must be a credential's name"),
    ('name = "o"\nurl = "https://x.example/"\nsecret_file = 3', "secret_file must be a path"),
    ('name = "o"\nurl = "https://x.example/"\nsecret_file = "s"\nevents = []',
     "events must be a non-empty list"),
    ('name = "o"\nurl = "https://x.example/"\nsecret_file = "s"\nevents = ["requestd"]',
     "unknown event 'requestd'"),
    ('name = "o"\nurl = "https://x.example/"\nsecret_file = "s"\nsecret = "x"',
     "unknown setting 'secret'"),
])
def test_a_bad_receiver_is_refused_naming_its_table_and_setting(table: str,
                                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        webhooks(f"[[webhooks]]\n{table}\n")
    assert "escrow.toml: webhooks[1]" in caught.value.message
    assert caught.value.hint


def test_two_receivers_of_one_name_and_a_webhooks_table_that_is_no_list_are_refused() -> None:
    entry = '[[webhooks]]\nname = "o"\nurl = "https://x.example/"\nsecret_file = "s"\n'
    with pytest.raises(ConfigError, match="two \\[\\[webhooks\\]\\] tables are named 'o'"):
        webhooks(entry * 2)
    with pytest.raises(ConfigError, match="webhooks must be a list of \\[\\[webhooks\\]\\]"):
        webhooks("[webhooks]\nname = 'o'\n")


def test_an_unusable_url_is_refused_without_quoting_it() -> None:
    with pytest.raises(ConfigError) as caught:
        webhooks(f'[[webhooks]]\nname = "o"\nurl = "{TOKEN_URL} x"\nsecret_file = "s"\n')
    assert "sekrit" not in caught.value.diagnostics()
    assert "sekrit" not in repr(WebhookSettings("o", TOKEN_URL))


def secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "oncall.secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_secret_is_read_from_its_file_or_its_credential_and_never_shown(
        tmp_path: Path) -> None:
    path = secret_file(tmp_path, SECRET.decode() + "\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "webhook-chat").write_bytes(b"f" * 64)
    (credentials / "webhook-chat").chmod(0o600)
    oncall, chat = open_receivers(
        [WebhookSettings("oncall", TOKEN_URL, secret_file=path),
         WebhookSettings("chat", TOKEN_URL, secret_credential="webhook-chat")],
        {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert (oncall.secret, chat.secret) == (SECRET, b"f" * 64)
    assert "sekrit" not in repr(oncall)
    assert SECRET.decode() not in repr(oncall)


@pytest.mark.parametrize(("text", "mode", "message"), [
    (SECRET.decode(), 0o644, "readable or writable by every user"),
    ("tiny-placeholder\n", 0o600, "shorter than 32 characters"),
    ("", 0o600, "is empty"),
])
def test_a_secret_file_anyone_can_read_or_too_short_is_refused(
        tmp_path: Path, text: str, mode: int, message: str) -> None:
    path = secret_file(tmp_path, text, mode)
    with pytest.raises(ConfigError, match=message) as caught:
        open_receivers([WebhookSettings("oncall", TOKEN_URL, secret_file=path)], {})
    assert "oncall" in caught.value.message
    if text:
        assert text.strip() not in caught.value.diagnostics()


def test_a_missing_credential_names_the_line_the_unit_needs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="credential webhook-chat") as caught:
        open_receivers([WebhookSettings("chat", TOKEN_URL, secret_credential="webhook-chat")],
                       {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "LoadCredential=webhook-chat:" in caught.value.hint


# -- retries --------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "verdict"), [
    (200, retry.Verdict.DELIVERED), (204, retry.Verdict.DELIVERED),
    (500, retry.Verdict.RETRY), (503, retry.Verdict.RETRY), (408, retry.Verdict.RETRY),
    (429, retry.Verdict.RETRY), (301, retry.Verdict.GIVE_UP), (307, retry.Verdict.GIVE_UP),
    (400, retry.Verdict.GIVE_UP), (401, retry.Verdict.GIVE_UP), (404, retry.Verdict.GIVE_UP),
    (410, retry.Verdict.GIVE_UP)])
def test_what_a_receivers_answer_means(status: int, verdict: retry.Verdict) -> None:
    assert retry.verdict(status) == verdict


def test_five_attempts_back_off_exponentially_with_jitter_within_about_a_minute() -> None:
    waits: list[float] = []
    attempts = 0

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def deliver() -> None:
        nonlocal attempts
        async for attempt in retry.retrying(sleep):
            with attempt:
                attempts += 1
                raise retry.Retryable("500")

    with pytest.raises(retry.Retryable):
        asyncio.run(deliver())
    assert attempts == retry.ATTEMPTS == 5
    assert len(waits) == 4
    for n, wait in enumerate(waits):
        assert 2 * 2 ** n <= wait <= 2 * 2 ** n + retry.JITTER_SECONDS
    worst = sum(waits) + retry.ATTEMPTS * retry.ATTEMPT_TIMEOUT_SECONDS
    assert sum(waits) >= 30
    assert worst <= 65


def test_a_final_failure_is_not_tried_again() -> None:
    attempts = 0

    async def deliver() -> None:
        nonlocal attempts
        async for attempt in retry.retrying(lambda seconds: asyncio.sleep(0)):
            with attempt:
                attempts += 1
                raise retry.Final("404")

    with pytest.raises(retry.Final):
        asyncio.run(deliver())
    assert attempts == 1


# -- what time brings about -----------------------------------------------------------------

def test_a_pending_request_is_expired_in_the_one_look_its_expiry_falls_in() -> None:
    expires = NOW + timedelta(seconds=10)
    asked = [request(expires=expires),
             request(request_id="r-denied", expires=expires, state=RequestState.DENIED),
             request(request_id="r-done", expires=expires, state=RequestState.COMPLETED)]
    looks = [(NOW, NOW + timedelta(seconds=5)), (NOW + timedelta(seconds=5), expires),
             (expires, expires + timedelta(seconds=5)),
             (expires + timedelta(seconds=5), expires + timedelta(seconds=10))]
    found = [[r.request_id for r in overdue.expired(asked, start, end)] for start, end in looks]
    assert found == [[], [], ["r-abc"], []]


def test_an_active_node_goes_silent_once_three_intervals_after_its_last_beat() -> None:
    last = beat(NOW, interval=30)
    silent = NOW + timedelta(seconds=90)
    latest = {("c" * 25, "n" * 25): last}
    assert list(overdue.went_silent([node()], latest, NOW, silent)) == []
    assert list(overdue.went_silent([node()], latest, silent,
                                    silent + timedelta(seconds=5))) == [(node(), last, silent)]
    assert list(overdue.went_silent([node()], latest, silent + timedelta(seconds=5),
                                    silent + timedelta(hours=1))) == []


def test_a_goodbye_counts_from_the_same_moment_so_a_quick_reboot_is_no_event() -> None:
    said = beat(NOW, goodbye=True)
    back = beat(NOW + timedelta(seconds=40), boot="b-2")  # the new boot beats within 90 s
    window = (NOW + timedelta(seconds=88), NOW + timedelta(seconds=92))
    key = ("c" * 25, "n" * 25)
    assert [b.goodbye for _, b, _ in overdue.went_silent([node()], {key: said}, *window)] == [
        True]
    assert list(overdue.went_silent([node()], {key: back}, *window)) == []


def test_a_node_never_heard_from_or_no_longer_active_never_goes_silent() -> None:
    key = ("c" * 25, "n" * 25)
    window = (NOW, NOW + timedelta(days=1))
    assert list(overdue.went_silent([node()], {}, *window)) == []
    for status in (NodeStatus.REVOKED, NodeStatus.QUARANTINED):
        assert list(overdue.went_silent([node(status)], {key: beat(NOW)}, *window)) == []


def test_every_kind_is_told_by_a_text_of_its_own() -> None:
    assert {e.kind for e in every_kind("manager-1")} == set(EventKind)
