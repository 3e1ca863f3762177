"""Service settings (environment, ``IMBOT_`` prefix) and the operator's policy file (YAML).

``Settings`` holds what differs between deployments and secrets; ``Policy`` holds
what operators edit as data: bots, which messages are AI conversations, models
and prices, routes, moderation and canned replies. Both are frozen and built once
in each service's ``main()``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from imbot.core.catalog import ModelConfig
from imbot.core.errors import ConfigurationError
from imbot.core.limits import USER_ID_MAX
from imbot.core.routing import Routing

DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.yaml")


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMBOT_", frozen=True, extra="ignore")

    # -- gateway --------------------------------------------------------------
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    callback_path: str = "/easemob/callback"
    callback_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Reject callbacks whose Easemob timestamp is further than this from our clock
    # (replay protection; 0 turns it off). Easemob stamps the message when it receives
    # it and calls us at once, so the skew is our clock's offset from Easemob's plus
    # the delivery time: well under a second with NTP. ±5 minutes (the reference's
    # suggestion) tolerates a badly drifting clock; a callId is remembered this long.
    callback_timestamp_window_s: float = 300.0
    # Where the callIds of signed callbacks are remembered (a replay of one is never
    # published): memory (one replica), database (PostgreSQL, shared by all
    # replicas), off; auto = database when IMBOT_DATABASE_URL is PostgreSQL.
    callback_replay_store: Literal["auto", "memory", "database", "off"] = "auto"
    # How long an AI message waits for the shared store before it is answered by the
    # fail policy. With publish_timeout_ms it must stay inside Easemob's 200 ms.
    callback_replay_timeout_ms: int = 50
    callback_max_body_bytes: int = 64 * 1024
    # How long the gateway waits for Kafka to acknowledge a publish before it
    # answers by the fail policy. Keep it well under the rule's wait time (200 ms).
    publish_timeout_ms: int = 120
    # Remember this many recently published msg_ids so an Easemob duplicate
    # (a second matching rule, an edit) is not published and billed twice.
    dedupe_window: int = 100_000
    # Slow clients. An idle keep-alive connection, and one that has not delivered a
    # complete request head, is closed after keepalive (aiohttp's keep-alive timer
    # runs from the connection's start and from each answer until the next head is
    # complete). Longer than the 60 s idle timeout of the usual proxy or load
    # balancer in front, so the gateway is not the side that closes a pooled
    # connection under a request. A body must arrive whole within body_timeout (408).
    gateway_keepalive_timeout_s: float = 75.0
    gateway_body_timeout_s: float = 5.0

    # -- kafka ----------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    # True when the broker is the embedded Tansu: applies its workarounds
    # (one record per batch, short fetch waits, short group timeouts).
    kafka_embedded: bool = False
    # How clients reach the cluster: PLAINTEXT (the embedded broker, a private network),
    # SSL, or SASL over either (Strimzi's SCRAM users: SASL_SSL + SCRAM-SHA-512).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: Path | None = None  # the cluster CA (Strimzi: <cluster>-cluster-ca-cert)
    kafka_idempotent_producer: bool = False
    # One record per produce batch (Tansu's end-offset defect). Defaults to on with
    # the embedded broker, off with a real cluster; see docs/benchmarks.md for its cost.
    kafka_single_record_batches: bool | None = None
    topic_prefix: str = ""
    topic_partitions: int = 6
    topic_replication: int = 1
    consumer_fetch_max_wait_ms: int = 10
    # Consumer group timeouts of the stage workers (seconds). None: 3 / 3 / 0.5 with
    # the embedded broker (it holds every join for about half the session), 10 / 10 / 1
    # with a real cluster. A SIGKILLed replica's partitions wait up to the session timeout
    # before the group moves them; the heartbeat interval is how soon the others
    # notice a rebalance; the rebalance timeout bounds how long the group waits for
    # every member to rejoin (keep it above stage_revoke_grace_s). See "Restarts" in
    # docs/benchmarks.md.
    kafka_session_timeout_s: float | None = None
    kafka_rebalance_timeout_s: float | None = None
    kafka_heartbeat_interval_s: float | None = None

    # -- stages ---------------------------------------------------------------
    stage_max_in_flight: int = 64  # concurrent messages per stage worker (distinct conversations)
    stage_deadline_s: float = 60.0  # retries of one message stop here, then DLQ
    stage_retry_base_s: float = 0.2
    stage_retry_max_s: float = 5.0
    # When a worker's partitions are taken away (a replica joins or leaves the group,
    # or this one stops), messages in flight on them get this long to finish; the rest
    # are cut short and redelivered (effects are idempotent; work left running on a
    # partition that comes back is not done twice). The whole group waits for the
    # slowest member here, so it bounds what a restart adds to every replica.
    stage_revoke_grace_s: float = 0.25
    # When this worker stops (SIGTERM: a rolling deploy, a scale-down), messages whose
    # handler is running get this long to finish before it leaves the group. Its
    # partitions stay its own meanwhile, so the other replicas are not held up, and a
    # model call already paid for is not cut short and paid for again by the replica
    # that takes the partition over. Messages not started yet are given up at once.
    # Keep it below the pod's terminationGracePeriodSeconds.
    stage_stop_grace_s: float = 20.0
    # 0: no metrics server. `imbot dev` gives each stage process its own port (from this
    # one when it is set, else from 9101 when free) and prints them.
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"  # where a worker's metrics server listens
    worker_lag_interval_s: float = 15.0  # how often a worker reads its group's consumer lag
    worker_group: str = ""  # consumer group; default derived from the stages run

    # -- storage --------------------------------------------------------------
    database_url: str = "sqlite+aiosqlite:///./imbot.db"

    # -- easemob REST ---------------------------------------------------------
    easemob_base_url: str = "https://a1.easemob.com"
    easemob_org: str = "demo-org"
    easemob_app: str = "demo-app"
    easemob_client_id: str = ""
    easemob_client_secret: SecretStr = SecretStr("")
    easemob_timeout_s: float = 10.0
    # Easemob allows ~100 REST calls/s per app. Each sender process paces itself
    # at rate / replicas (set IMBOT_SENDER_REPLICAS to the Deployment's replicas);
    # 0 turns pacing off.
    easemob_rate_limit: float = 100.0
    sender_replicas: int = 1
    # A reply longer than this (UTF-8 bytes of the text) is sent in parts; Easemob
    # limits body + ext to about 5 KB. A 413 halves it for the part that got it.
    sender_max_part_bytes: int = 3000
    # In groups and chatrooms, @-mention the asker (ext.em_at_list) in the reply.
    sender_mention_asker: bool = True
    # How long the sender keeps retrying one reply (429, 5xx, Easemob down) before DLQ.
    sender_deadline_s: float = 600.0

    # -- console (imbot console, docs/console.md) ------------------------------
    # Loopback by default: the console shows conversations; it is published through the
    # Ingress (deploy/) or a tunnel, never by accident.
    console_host: str = "127.0.0.1"
    console_port: int = 8070  # beside the gateway (8080) and the dev simulator (8090)
    # Who may log in: "name:role:token" entries, comma separated; role is operator (sees
    # text, may act) or viewer (ids and metadata only). Empty: only a trusted proxy logs in.
    console_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Signs session cookies. Empty: a random key per process (sessions end at a restart,
    # and replicas do not share them: set it when the console runs more than once).
    console_session_key: SecretStr = SecretStr("")
    console_session_hours: float = 12.0
    # Trust an authenticating proxy's X-Forwarded-User / X-Forwarded-Groups (oauth2-proxy).
    # Off by default: without a proxy in front anyone could send the headers.
    console_trusted_proxy: bool = False
    console_operator_groups: Annotated[tuple[str, ...], NoDecode] = ("imbot-operators",)
    console_viewer_groups: Annotated[tuple[str, ...], NoDecode] = ("imbot-viewers",)
    # Rates for the overview: a Prometheus that scrapes the services, or else the
    # services' own /metrics pages (comma separated URLs; `imbot dev` sets them).
    prometheus_url: str = ""
    console_metrics_urls: Annotated[tuple[str, ...], NoDecode] = ()
    # How long the console waits for Prometheus or a /metrics page before it shows the
    # page without that part (the overview must stay fast when a service is down).
    console_fetch_timeout_s: float = 2.0

    # -- operations -----------------------------------------------------------
    policy_file: Path = DEFAULT_POLICY_FILE
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator(
        "callback_secrets",
        "console_tokens",
        "console_operator_groups",
        "console_viewer_groups",
        "console_metrics_urls",
        mode="before",
    )
    @classmethod
    def _secrets_from_commas(cls, value: object) -> object:
        return _split_commas(value)

    @property
    def single_record_batches(self) -> bool:
        if self.kafka_single_record_batches is None:
            return self.kafka_embedded
        return self.kafka_single_record_batches

    def topic(self, base: str) -> str:
        return f"{self.topic_prefix}{base}" if self.topic_prefix else base

    @cached_property
    def policy(self) -> Policy:
        return load_policy(self.policy_file)

    def secret_values(self) -> list[str]:
        return [s.get_secret_value() for s in self.callback_secrets]

    @property
    def kafka_sasl(self) -> bool:
        return self.kafka_security_protocol.startswith("SASL")

    @property
    def kafka_tls(self) -> bool:
        return self.kafka_security_protocol.endswith("SSL")


# ---------------------------------------------------------------------------
# Policy (YAML)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Bot(_Frozen):
    # An Easemob user id: every id derived from it (conversation ids, ledger rows)
    # is sized for this bound (core.limits).
    id: str = Field(min_length=1, max_length=USER_ID_MAX)
    name: str = ""
    route: str = "default"

    @field_validator("id")
    @classmethod
    def _printable_id(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("a bot id must be printable text (no control characters)")
        return value


class AiRules(_Frozen):
    """Which messages belong to an AI conversation."""

    direct_to_bot: bool = True  # 1:1 messages whose `to` is a bot account
    group_mention: bool = True  # group/chatroom messages that @-mention a bot (ext.em_at_list)
    mention_all: bool = False  # whether @all counts as mentioning the bot
    # Opt-in: an ext key whose value true marks any message as AI. Any client can set
    # ext, so with it on any app user can make the bot answer any message.
    ext_flag: str | None = None
    ext_bot_key: str = "imbot_bot"  # ext key naming the bot to answer (with ext_flag)
    chat_types: tuple[Literal["chat", "group", "chatroom"], ...] = ("chat", "group", "chatroom")
    # Body types that may start an AI conversation; others pass through untouched.
    # Non-text types listed here get the policy's `unsupported` reply from the router.
    body_types: tuple[str, ...] = ("txt", "combine", "img", "audio", "video", "file", "loc")


class CallbackPolicy(_Frozen):
    # What Easemob is told about the user's own message once it is published:
    # pass = deliver it to the recipients (the bot's inbox / the group) as usual;
    # intercept = block it (only the AI reply is delivered).
    ai_message: Literal["pass", "intercept"] = "pass"
    intercept_code: str = "IMBOT_AI_HANDLED"
    # What to answer when Kafka cannot take the message within the budget.
    kafka_failure: Literal["pass", "block"] = "pass"
    kafka_failure_code: str = "IMBOT_UNAVAILABLE"
    # Fast path: run the sensitive-word lexicon in the gateway and refuse a blocked
    # message before Easemob delivers it ({"valid": false, "code": blocked_input_code}).
    refuse_blocked_input: bool = False
    blocked_input_code: str = "IMBOT_BLOCKED"


class RoutePolicy(_Frozen):
    """A bot's persona: its prompt and history window, and either a fixed model chain
    or (with ``routing.tiers``) the chain the user's tier and the question's level pick."""

    models: tuple[str, ...] = ()
    system_prompt: str | None = None
    max_output_tokens: int | None = 1024
    history_turns: int = 10
    history_token_budget: int = 2000
    # Call the model as a stream (the provider starts answering sooner; a stream that
    # breaks is settled with what it produced).
    stream: bool = False


class Streaming(_Frozen):
    """Answers shown as they are written (docs/streaming.md): an Easemob stream message in
    1:1 chats and groups, the reviewed text growing sentence by sentence; a typing
    indicator where a whole message is sent instead."""

    enabled: bool = True
    # Where an answer is streamed: "chat" (1:1) and "group". Easemob streams to groups of
    # at most 200 members; leave "group" out when the app has larger groups. Chatrooms
    # never stream (no stream endpoint).
    chat_types: tuple[Literal["chat", "group"], ...] = ("chat", "group")
    # The model stage publishes the text so far at most this often (seconds), once a
    # sentence or a clause has ended since the last time.
    chunk_interval_s: float = Field(default=0.4, ge=0.05, le=10.0)
    # ... and a model worker publishes at most this many such records a second in all
    # (each can become an Easemob call; the app has 100 a second, whole messages
    # included): with N model workers, about (100 - room for whole messages) / N.
    max_chunk_records_per_s: float = Field(default=60.0, gt=0.0)
    # The review holds back an unfinished sentence; one that has grown longer than this
    # many characters is released up to its last clause break (，、, a space) so the user
    # is not kept waiting.
    max_hold_chars: int = Field(default=16, ge=1, le=4000)
    # Where the answer is not streamed (chatrooms, larger groups, streaming off): a cmd
    # TypingBegin to the asker when the model call starts, repeated while it runs.
    # What it shows depends on the client app handling that action.
    typing: bool = True
    typing_every_s: float = Field(default=5.0, ge=1.0, le=60.0)


class Replies(_Frozen):
    fallback: str = "抱歉，AI 助手暂时无法回答，请稍后再试。"
    blocked_input: str = "抱歉，这个问题我无法回答。"
    blocked_output: str = "抱歉，这个回答未能通过内容审核。"
    rejected: str = "抱歉，这个问题我无法回答。"
    unsupported: str = "目前我只能阅读文字消息。"
    quota_exhausted: str = "抱歉，你今天的 AI 额度已用完，请明天再来。"
    reset_done: str = "好的，之前的对话我已经忘记了，我们重新开始吧。"
    # {tier}, {daily_tokens_left}, {daily_cost_left}, {monthly_cost_left}, {currency}
    # ("不限" where no limit is set), {reset} (the first reset word).
    help: str = (
        "你的等级：{tier}。今日剩余：{daily_tokens_left} tokens，{daily_cost_left} {currency}；"
        "本月剩余：{monthly_cost_left} {currency}。发送 {reset} 可清除对话记忆。"
    )


# Emoji modifiers a rating word is read without: the variation selector that asks for
# the emoji presentation, and the five skin tones (👍🏽 is 👍).
_EMOJI_MODIFIERS = dict.fromkeys(
    map(ord, "\ufe0f\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff")
)
_RATING_NAME = r"^[a-z][a-z0-9_]{0,15}$"


def _default_ratings() -> dict[str, tuple[str, ...]]:
    return {
        "up": ("up", "👍", "good", "有用", "赞"),
        "down": ("down", "👎", "bad", "没用", "踩"),
    }


def rating_word(word: str) -> str:
    """A rating word as it is compared: trimmed, case-folded, without emoji modifiers."""
    return word.translate(_EMOJI_MODIFIERS).strip().casefold()


class Feedback(_Frozen):
    """How a client app rates a bot's answer with an ordinary IM message (docs/feedback.md).

    The gateway looks for it before deciding whether a message is for the AI: a cmd
    message whose action is ``cmd_action``, a custom message whose event is
    ``custom_event``, or any message whose ``ext`` has ``ext_key``, naming the reply's
    Easemob msg id (``msg_id_field``) and a rating word (``rating_field``). Such a
    message is recorded and counted, passes to its recipients as usual, and is never
    answered. A name set to null turns that shape off.
    """

    enabled: bool = True
    cmd_action: str | None = "imbot_feedback"
    custom_event: str | None = "imbot_feedback"
    ext_key: str | None = "imbot_feedback"
    msg_id_field: str = Field("msg_id", min_length=1)
    rating_field: str = Field("rating", min_length=1)
    # Rating -> the words and emoji that give it. The rating names are what the table
    # and the metric's label hold: a few short names, never free text from a client.
    ratings: dict[Annotated[str, Field(pattern=_RATING_NAME)], tuple[str, ...]] = Field(
        default_factory=_default_ratings,
        min_length=1,
        max_length=8,
    )

    @field_validator("ratings")
    @classmethod
    def _words_name_one_rating(
        cls, ratings: dict[str, tuple[str, ...]]
    ) -> dict[str, tuple[str, ...]]:
        seen: dict[str, str] = {}
        for rating, words in ratings.items():
            for word in (rating, *words):
                key = rating_word(word)
                if not key:
                    raise ValueError(f"ratings.{rating}: an empty word")
                if seen.setdefault(key, rating) != rating:
                    raise ValueError(f"{word!r} is a word of both {seen[key]!r} and {rating!r}")
        return ratings

    @cached_property
    def words(self) -> dict[str, str]:
        """Each accepted word (``rating_word`` form, the rating names included) -> its rating."""
        return {
            rating_word(word): rating
            for rating, words in self.ratings.items()
            for word in (rating, *words)
        }

    def rating_of(self, word: str) -> str | None:
        """The rating ``word`` gives, or None when it is not one of the configured words."""
        if len(word) > 64:
            return None
        return self.words.get(rating_word(word))


class Policy(_Frozen):
    bots: tuple[Bot, ...] = (Bot(id="ai_bot", name="AI"),)
    ai: AiRules = AiRules()
    callback: CallbackPolicy = CallbackPolicy()
    # The model catalog, validated here (core.catalog) so every service refuses the
    # same bad entry; moderation config is validated by its owner (moderation).
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    routes: dict[str, RoutePolicy] = Field(
        default_factory=lambda: {"default": RoutePolicy(models=("demo",))}
    )
    routing: Routing = Routing()
    moderation: dict[str, Any] = Field(default_factory=dict)
    replies: Replies = Replies()
    feedback: Feedback = Feedback()
    streaming: Streaming = Streaming()

    @cached_property
    def bot_ids(self) -> frozenset[str]:
        return frozenset(b.id for b in self.bots)

    def bot(self, bot_id: str) -> Bot | None:
        for b in self.bots:
            if b.id == bot_id:
                return b
        return None


def load_policy(path: Path) -> Policy:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigurationError(f"cannot read policy file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"policy file {path} is not valid YAML: {exc}") from None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(f"policy file {path} is invalid: {exc}") from None
    check_policy(policy, where=f"policy file {path}")
    return policy


def check_policy(policy: Policy, *, where: str = "policy") -> None:
    """The rules between sections: every model a route or tier names is in the catalog,
    and every route has a chain to answer with."""
    for name, route in policy.routes.items():
        for model in route.models:
            if model not in policy.models:
                raise ConfigurationError(f"{where}: routes.{name} names unknown model {model!r}")
        if not route.models and not policy.routing.enabled:
            raise ConfigurationError(
                f"{where}: routes.{name}.models is empty and routing.tiers defines no tiers"
            )
    for model in sorted(policy.routing.model_names()):
        if model not in policy.models:
            raise ConfigurationError(f"{where}: routing names unknown model {model!r}")
    if "default" not in policy.routes:
        raise ConfigurationError(f"{where}: needs a route named 'default'")
    for name, entry in policy.models.items():
        if entry.price.currency != policy.routing.currency:
            raise ConfigurationError(
                f"{where}: models.{name}.price is in {entry.price.currency}, the budgets in"
                f" {policy.routing.currency} (routing.currency): one currency per policy"
            )


def load_settings(**overrides: Any) -> Settings:
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid IMBOT_ settings: {exc}") from None
    return settings
