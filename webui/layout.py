"""The shell around every page: theme, header with navigation, and small shared widgets."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from nicegui import ui

__all__ = ["NAV", "Shell", "assistant_bubble", "empty_state", "tool_button", "user_bubble"]

NAV = [
    ("/", "Chat", "chat_bubble_outline"),
    ("/side-by-side", "Side by side", "view_column"),
    ("/arena", "Arena", "sports_mma"),
    ("/leaderboard", "Leaderboard", "leaderboard"),
    ("/nodes", "Nodes", "hub"),
    ("/jobs", "Jobs", "work_history"),
    ("/usage", "Usage", "data_usage"),
]

_CSS = """
body { background: #f6f7fb; --cb-bg: #f6f7fb; --cb-surface: #ffffff; --cb-text: #1d1d27; }
.body--dark { background: #121318; --cb-bg: #121318; --cb-surface: #1f2029; --cb-text: #e8e8f0; }
.cb-header { background: color-mix(in srgb, var(--cb-surface) 90%, transparent) !important; color: var(--cb-text);
  border-bottom: 1px solid rgba(128, 128, 128, .2); }
.cb-surface { background: var(--cb-surface); color: var(--cb-text); }
.cb-surface textarea, .cb-surface .q-field__native { color: var(--cb-text) !important; }
.cb-composer-strip { background: linear-gradient(to top, var(--cb-bg) 70%, transparent); }
/* Toasts sit above the composer, never over the input and the send button. */
.q-notifications__list--bottom { bottom: 110px !important; }
.cb-table-wrap { overflow-x: auto; width: 100%; }
.cb-bubble-user { background: #ecebff; border-radius: 18px 18px 4px 18px; white-space: pre-wrap; }
.body--dark .cb-bubble-user { background: #2d2a52; }
.cb-answer .nicegui-markdown p:first-child { margin-top: 0; }
.cb-answer .nicegui-markdown pre { background: #f0f1f5; border-radius: 10px; padding: 10px 12px; overflow-x: auto; }
.body--dark .cb-answer .nicegui-markdown pre { background: #1d1f27; }
.cb-answer .nicegui-markdown code { font-size: 0.86em; }
.cb-answer .nicegui-markdown pre { position: relative; }
.cb-code-copy { position: absolute; top: 6px; right: 6px; font-size: 12px; padding: 1px 8px; border-radius: 6px;
  border: 1px solid rgba(128, 128, 128, .35); background: var(--cb-surface); color: var(--cb-text);
  opacity: .75; cursor: pointer; }
.cb-code-copy:hover { opacity: 1; }
.cb-composer { border-radius: 22px; box-shadow: 0 4px 24px rgba(30, 30, 80, .10); }
.cb-nav .q-btn { border-radius: 999px; text-transform: none; color: var(--cb-text); opacity: .85;
  padding: 6px 14px; }
.cb-nav .cb-active { background: #ecebff; color: #5b4ee6; }
.body--dark .cb-nav .cb-active { background: #2d2a52; color: #c9c3ff; }
.cb-cursor::after { content: '▍'; animation: cb-blink 1s steps(2) infinite; margin-left: 1px; }
@keyframes cb-blink { 50% { opacity: 0; } }
.cb-typing span { display:inline-block; width:7px; height:7px; margin-right:3px; border-radius:50%;
  background:#9b95f5; animation: cb-bounce 1.2s infinite; }
.cb-typing span:nth-child(2) { animation-delay: .15s; } .cb-typing span:nth-child(3) { animation-delay: .3s; }
@keyframes cb-bounce { 0%, 80%, 100% { transform: scale(.6); opacity:.5 } 40% { transform: scale(1); opacity:1 } }
/* Small screens (Quasar's gt-xs drops the nav labels and the title): panes stack, tables scroll. */
@media (max-width: 700px) {
  .cb-nav .q-btn { padding: 6px 8px; }
  .cb-tool { padding: 4px 6px; min-width: 0; }
  .cb-picker { min-width: 140px !important; }
  .cb-split { flex-direction: column !important; flex-wrap: nowrap !important; }
  .cb-split > * { width: 100% !important; }
}
/* A phone: seven page icons, the brand and the dark-mode button in 390 px. */
@media (max-width: 480px) {
  .cb-nav { gap: 0 !important; }
  .cb-nav .q-btn { padding: 6px 4px; }
  .cb-header { padding-left: 8px !important; padding-right: 8px !important; }
}
"""


# A Copy button on every code block of an answer (added in the browser: answers re-render while they stream).
_CODE_COPY = """<script>
(() => {
  const fallback = (text) => {  // plain http on another host has no navigator.clipboard
    const area = Object.assign(document.createElement('textarea'), {value: text});
    document.body.appendChild(area); area.select(); document.execCommand('copy'); area.remove();
  };
  const copy = (text) => (navigator.clipboard ? navigator.clipboard.writeText(text) : Promise.reject())
    .catch(() => fallback(text));
  const decorate = () => document.querySelectorAll('.cb-answer pre:not([data-cb-copy])').forEach((pre) => {
    pre.dataset.cbCopy = '1';
    const button = Object.assign(document.createElement('button'), {type: 'button', className: 'cb-code-copy',
      textContent: 'Copy'});
    button.addEventListener('click', () => copy((pre.querySelector('code') || pre).innerText).then(() => {
      button.textContent = 'Copied';
      setTimeout(() => { button.textContent = 'Copy'; }, 1500);
    }));
    pre.appendChild(button);
  });
  new MutationObserver(decorate).observe(document.body, {childList: true, subtree: true});
})();
</script>"""


class Shell:
    """Header with the brand and the page links; `activate(path)` highlights the current one."""

    def __init__(self, title: str, storage: MutableMapping[str, Any] | None = None) -> None:
        ui.colors(primary="#5b4ee6", secondary="#26a69a", accent="#f59e0b")
        ui.add_css(_CSS)
        ui.add_body_html(_CODE_COPY)
        ui.page_title(title)
        self._buttons: dict[str, ui.button] = {}
        # The mode is kept in the user's storage: a reload (or another tab) opens in the same mode.
        prefs: MutableMapping[str, Any] = storage if storage is not None else {}
        self.dark = ui.dark_mode(bool(prefs.get("dark", False)))
        self.dark.bind_value_to(prefs, "dark")
        with ui.header().classes("cb-header backdrop-blur px-4 py-2"):
            with ui.row().classes("w-full items-center no-wrap gap-2"):
                with (
                    ui.row()
                    .classes("items-center gap-2 cursor-pointer")
                    .on("click", lambda: ui.navigate.to("/"))
                ):
                    ui.icon("forum", size="28px", color="primary")
                    ui.label(title).classes("text-xl font-bold tracking-tight gt-xs")
                ui.space()
                with ui.row().classes("cb-nav items-center gap-1 no-wrap"):
                    for path, label, icon in NAV:
                        button = (
                            ui.button(icon=icon, on_click=_go(path))
                            .props("flat no-caps dense")
                            .mark(f"nav-{label.lower().replace(' ', '-')}")
                        )
                        with button:  # the label goes on phones (Quasar's gt-xs): icons alone fit
                            ui.label(label).classes("gt-xs q-ml-sm")
                        self._buttons[path] = button
                ui.space()
                ui.button(icon="dark_mode", on_click=self.dark.toggle).props("flat round dense").mark(
                    "dark-toggle"
                ).tooltip("Dark mode")

    def activate(self, path: str) -> None:
        for p, button in self._buttons.items():
            button.classes(add="cb-active") if p == path else button.classes(remove="cb-active")


def _go(path: str) -> Callable[[], None]:
    return lambda: ui.navigate.to(path)


def tool_button(label: str, icon: str, on_click: Callable[[], object], marker: str) -> ui.button:
    """A flat page action whose label gives way to its icon (and a tooltip) on a phone."""
    with (
        ui.button(icon=icon, on_click=on_click)
        .props("flat no-caps rounded")
        .classes("cb-tool")
        .mark(marker) as button
    ):
        ui.label(label).classes("gt-xs q-ml-sm")
        ui.tooltip(label)
    return button


def user_bubble(text: str) -> None:
    with ui.row().classes("w-full justify-end"):
        ui.label(text).classes("cb-bubble-user px-4 py-2 max-w-[80%] text-[15px]").mark("user-bubble")


def assistant_bubble(name: str, text: str = "", *, icon: str = "auto_awesome") -> ui.markdown:
    """An answer: avatar, model name, Markdown body (code highlighted). Returns the body."""
    with ui.row().classes("w-full no-wrap items-start gap-3 cb-answer"):
        ui.avatar(icon, color="primary", text_color="white", size="34px").classes("shrink-0 mt-1")
        with ui.column().classes("gap-1 grow min-w-0") as column:
            ui.label(name).classes("text-xs font-medium text-grey-6 cb-model-name")
            body = ui.markdown(text).classes("w-full text-[15px] leading-relaxed")
    body.column = column  # type: ignore[attr-defined]  # where actions go
    return body


def typing_dots() -> ui.html:
    return ui.html("<span></span><span></span><span></span>").classes("cb-typing py-2")


def empty_state(title: str, subtitle: str, suggestions: list[str], on_pick: Callable[[str], object]) -> None:
    with ui.column().classes("w-full items-center gap-3 pt-16 pb-6"):
        ui.icon("auto_awesome", size="48px", color="primary")
        ui.label(title).classes("text-3xl font-semibold text-center")
        ui.label(subtitle).classes("text-grey-6 text-center")
        with ui.row().classes("justify-center gap-2 pt-4 max-w-2xl"):
            for s in suggestions:
                ui.button(s, on_click=lambda s=s: on_pick(s)).props("outline no-caps rounded").classes(
                    "cb-surface"
                )
