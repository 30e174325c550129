"""Every HTML builder of the app: tokens shaded by a latent's activation, and a feature's stored examples.
Token text is user data: every string that reaches the markup goes through `html.escape` here, so a page shows
the result with st.html as it is."""

from __future__ import annotations

import html
from typing import Sequence

import pandas as pd

from explorer.tables import example_tokens

HIGHLIGHT_RGB = "255, 140, 0"
"""Token highlight colour; its opacity is the activation over the scale."""


def escape_token(token: str, breaks: bool = False) -> str:
    """A token as HTML: escaped, with tabs made visible and line breaks shown as ↵ (and broken when `breaks`)."""
    text = html.escape(token).replace("\t", "⇥")
    return text.replace("\n", "↵<br>" if breaks else "↵")


def tokens_html(tokens: Sequence[str], acts: Sequence[float], scale: float | None = None, center: int | None = None,
                titles: Sequence[str] | None = None, breaks: bool = False) -> str:
    """Tokens in a row, each shaded by its activation (one per token) over `scale` (default: the largest);
    `center` is underlined; `titles` are hover texts (default: the activation)."""
    scale = scale or max((float(a) for a in acts), default=0.0) or 1.0
    spans = []
    for i, (token, act) in enumerate(zip(tokens, acts)):
        alpha = min(max(float(act) / scale, 0.0), 1.0)
        style = f"background-color: rgba({HIGHLIGHT_RGB}, {alpha:.2f});" if alpha > 0 else ""
        if i == center:
            style += " border-bottom: 2px solid #c0392b; font-weight: 600;"
        title = titles[i] if titles is not None else (f"{float(act):.3f}" if act > 0 else "")
        title_attr = f' title="{html.escape(title)}"' if title else ""
        active = " msae-active" if alpha > 0 else ""
        spans.append(f'<span class="msae-tok{active}" style="{style}"{title_attr}>{escape_token(token, breaks)}</span>')
    return ('<div class="msae-tokens" style="font-family: ui-monospace, monospace; white-space: pre-wrap; '
            f'line-height: 1.8;">{"".join(spans)}</div>')


def examples_html(examples: pd.DataFrame, vocab: Sequence[str], scale: float | None = None) -> str:
    """One line per stored example (a store's examples rows): its activation, then its window with every token
    shaded by the latent."""
    if examples.empty:
        return '<div class="msae-examples"><i>no examples</i></div>'
    rows = []
    for ex in examples.itertuples():
        tokens, acts, center = example_tokens(ex.tokens, ex.acts, int(ex.center), vocab)
        body = tokens_html(tokens, acts, scale=scale, center=center)
        rows.append('<div class="msae-example" style="display: flex; gap: 0.8em; padding: 2px 0; '
                    'border-bottom: 1px solid rgba(128,128,128,0.2);">'
                    f'<span style="min-width: 4.5em; color: #888; font-family: monospace;">{float(ex.act):.3f}</span>'
                    f'{body}</div>')
    return f'<div class="msae-examples">{"".join(rows)}</div>'
