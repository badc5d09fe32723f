"""A delete button with a confirmation that names what goes, and the force option said plainly.

The server refuses to delete what live iterations read (``IterationBusy``, naming them);
the confirmation then shows that refusal and offers to end those iterations first (their
training jobs stop with ``IterationNotFound``). Nothing is deleted before the user
confirms.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import panel as pn
import param

from ..protocol.errors import IterationBusy
from .common import TABLE_CSS, Page, describe_error

__all__ = ["ConfirmDelete", "Doomed", "web_words"]

FORCE_LABEL = (
    "End the live iterations first: their training jobs stop at once with IterationNotFound"
)


@dataclass(frozen=True)
class Doomed:
    """What a delete takes away, as the confirmation says it."""

    what: str
    """The thing, named: ``dataset 'flowers' (ds-1234)``."""
    consequences: str = ""
    """What goes with it and what stays: ``its 2 shardsets and 3 iterations leave ...``."""
    live: str = ""
    """The live iterations known now (``it-a (1 open stream)``); empty: none known."""


def web_words(text: str) -> str:
    """A server's refusal reworded for a web form: the force option is the box to tick."""
    return text.replace("with force=True", "with the box below ticked")


class ConfirmDelete(Page):
    """*Delete ...* then *Delete* or *Cancel*; see the module docstring.

    ``describe`` says what would go (called when the user asks); ``delete(force)`` deletes
    and answers the message to show. ``deleted`` turns True once it is done.
    """

    label = param.String(default="Delete", doc="The button that asks: 'Delete dataset'.")
    describe = param.Callable(doc="What would go: () -> Doomed.")
    delete = param.Callable(doc="Delete it: (force) -> the message to show.")
    asking = param.Boolean(default=False, doc="The confirmation is open.")
    doomed = param.ClassSelector(class_=Doomed, default=None, doc="What the confirmation names.")
    busy = param.String(default="", doc="The server's refusal: live iterations read it.")
    force = param.Boolean(default=False, doc="End the live iterations first.")
    deleted = param.Boolean(default=False, doc="It is gone.")
    disabled = param.Boolean(default=False, doc="Nothing to delete (not found, gone).")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._ask = pn.widgets.Button(label=f"{self.label}…", color="danger", variant="outline")
        self._ask.on_click(self._on_ask)
        self._confirm = pn.widgets.Button(label="Delete", color="danger")
        self._confirm.on_click(self._on_confirm)
        self._cancel = pn.widgets.Button(label="Cancel")
        self._cancel.on_click(lambda _: self.cancel())
        self._force = pn.widgets.Checkbox.from_param(
            self.param.force, name=FORCE_LABEL, css_classes=["lf-force"]
        )
        self._text = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self._box = pn.Column(
            self._text,
            self._force,
            pn.Row(self._confirm, self._cancel),
            css_classes=["lf-confirm-box"],
            sizing_mode="stretch_width",
            visible=False,
        )
        self._render()

    def _on_ask(self, _event: object) -> None:
        self.ask()

    def _on_confirm(self, _event: object) -> None:
        # one change for the browser: the page that takes over the message (and hides this
        # box) must not show it twice for a moment
        with pn.io.hold():
            self.confirm()

    def ask(self) -> Doomed | None:
        """Open the confirmation, naming what would go (nothing is deleted yet)."""
        if self.disabled or self.describe is None:
            return None
        doomed: Doomed | None = None
        with self.calling():
            doomed = self.describe()
        if doomed is None:
            return None
        self.message, self.busy, self.force, self.deleted = "", "", False, False
        self.doomed, self.asking = doomed, True
        return doomed

    def cancel(self) -> None:
        """Close the confirmation; nothing happens."""
        self.asking, self.busy, self.force = False, "", False

    def confirm(self) -> bool:
        """Delete (ending the live iterations first when ``force``); True when done.

        A refusal because live iterations read it keeps the confirmation open with the
        server's words and the force option.
        """
        if not self.asking or self.delete is None:
            return False
        try:
            said = self.delete(self.force)
        except IterationBusy as exc:
            self.error = ""
            self.busy = web_words(" ".join(str(exc).split()))
            return False
        except Exception as exc:
            self.error = describe_error(exc)
            return False
        self.error, self.busy = "", ""
        self.asking, self.force = False, False
        self.message = str(said)
        self.deleted = True
        return True

    @param.depends("asking", "doomed", "busy", "force", "disabled", watch=True)
    def _render(self) -> None:
        self._ask.disabled = self.disabled or self.asking
        self._box.visible = self.asking
        doomed = self.doomed
        if doomed is None:
            self._text.object = ""
            return
        parts = [f'<p class="lf-doomed"><b>Delete {html.escape(doomed.what)}?</b></p>']
        if doomed.consequences:
            parts.append(f"<p>{html.escape(doomed.consequences)}</p>")
        live = self.busy or (f"Live now: {doomed.live}." if doomed.live else "")
        if live:
            parts.append(f'<p class="lf-busy"><span class="lf-live">{html.escape(live)}</span></p>')
        self._text.object = f'<div class="lf-confirm">{"".join(parts)}</div>'
        self._force.visible = bool(live)
        self._confirm.label = "End them and delete" if self.force else "Delete"

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self._ask, self._box, self._alerts, sizing_mode="stretch_width")
