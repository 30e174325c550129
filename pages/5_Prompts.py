"""Prompts: type a prompt or upload many (.txt, .csv with a text column, .jsonl); per-token highlight and heatmap of
the top latents, the top latents per prompt, the hierarchy paths of the active latents, and a CSV of everything."""

import streamlit as st

from explorer import figures, html, loaders, state, tables
from msae.analysis.inference import MAX_TOKENS, top_latents
from msae.uploads import UploadError, max_upload_mb, read_prompts

MAX_PROMPTS = 100
DEFAULT_PROMPT = "The cat sat on the mat. <b>Bold</b> claims need evidence."

run = state.setup("Prompts")
st.title("Prompts")
if run is None:
    st.stop()
store = loaders.store_of(run, quiet=True)
latents = store.latents if store is not None else None
if store is None:
    st.caption(f"This run has no feature store: latents show without labels or hierarchy paths (run "
               f"`msae analyze {run}`).")

source = st.radio("prompts", ["type one", "upload a file"], horizontal=True, key="prompt_source")
prompts: list[str] = []
if source == "type one":
    text = st.text_area("prompt", value=DEFAULT_PROMPT, key="prompt_text", height=120)
    prompts = [text] if text.strip() else []
else:
    limit = max_upload_mb()
    upload = st.file_uploader(f"a .txt (prompts separated by blank lines), .csv (a 'text' column) or .jsonl (a "
                              f"\"text\" field) file; at most {limit} MB", key="prompt_file", max_upload_size=limit)
    if upload is not None:
        try:
            prompts, total = read_prompts(upload.name, upload.getvalue(), MAX_PROMPTS)
        except UploadError as exc:
            st.error(str(exc))
        else:
            if total > MAX_PROMPTS:
                st.warning(f"The file holds {total} prompts; the first {MAX_PROMPTS} are read.")
if not prompts:
    st.info("Type a prompt or upload a file of prompts.")
    st.stop()

results = []
progress = st.progress(0.0, text="Reading the prompts…") if len(prompts) > 1 else None
for i, prompt in enumerate(prompts):
    result = loaders.read_text([run], prompt)
    if result is None:
        st.stop()
    results.append(result)
    if progress is not None:
        progress.progress((i + 1) / len(prompts), text=f"Read {i + 1} of {len(prompts)} prompts")
if any(r.truncated for r in results):
    st.warning(f"Prompts longer than {MAX_TOKENS} tokens were cut there.")

st.download_button("Download every active latent as CSV", tables.results_csv(results, latents), "msae-prompts.csv",
                   "text/csv", key="prompt_csv")

if len(prompts) > 1:
    st.subheader("Top latents per prompt")
    st.dataframe(tables.prompts_overview(prompts, results, latents), hide_index=True)
    which = st.selectbox("prompt to inspect", list(range(len(prompts))), key="prompt_pick",
                         format_func=lambda i: f"{i}: {prompts[i][:80]}")
else:
    which = 0
result = results[which]
frame = result.latents[0]
if frame.empty:
    st.info("No latent fires on this prompt.")
    st.stop()

c1, c2 = st.columns([3, 1])
n_top = c2.slider("top latents", 5, 50, 15, key="prompt_ntop")
top = tables.with_labels(top_latents(frame, n_top), latents)
names = dict(zip(top["latent"].astype(int), top["label"]))
highlight = c1.selectbox("highlight the tokens by", list(names), key=f"prompt_highlight_{which}",
                         format_func=lambda l: f"latent #{l} {names[l]}")
acts = tables.latent_acts(frame, highlight, len(result.tokens))
titles = tables.per_token_table(result.tokens, frame, latents, n=3)["strongest latents"].tolist()
st.html(html.tokens_html(result.tokens, acts, titles=titles, breaks=True))
st.caption("Tokens shaded by the chosen latent's activation; hover a token for its strongest latents.")

st.subheader("Top latents on every token")
st.plotly_chart(figures.heatmap_figure(result.tokens, frame, top["latent"].astype(int).tolist(),
                                       top["label"].tolist()))
st.dataframe(top, hide_index=True)

if latents is not None and "tree_parent" in latents:
    st.subheader("Hierarchy paths of the top latents")
    st.caption("Each latent's chain of parents in the store's tree, root first; ● marks latents active on this prompt.")
    st.dataframe(tables.paths_table(latents, top), hide_index=True)
