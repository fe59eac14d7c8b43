"""`report.html`: the page where a user checks a prepped dataset before spending GPU hours on it.

One self-contained file beside `thumbs/` and `plots/`: inline CSS and plain JavaScript, no
remote resource (it works offline, from the output folder, in any browser). Sections: counts,
the curation decisions per character and the edit rules' counts, a gallery of every kept image
(thumbnail with the trained crop drawn on it, the final caption with head, body and tail told
apart and the folded, removed, replaced or cut tags struck through, bucket, repeats, mask,
source file) with filters by tag, character and problem, the tag frequencies as a sortable
table, rejected files with their reasons, duplicates beside the copy that was kept, and the plots.
The gallery is JSON rendered a page at a time by the script, with lazy images, so a 10,000-image
report opens in about a second.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from captioning.tags import display_tag
from train.prep.gallery import GALLERY_MAX, PROBLEMS, THUMBS, GalleryItem, thumb_name

THUMB_BOX = 200  # px: the longest side of a thumbnail as shown
TAG_TABLE_MAX = 20_000  # rows of the tag table (most frequent first)
TAG_ROWS_SHOWN = 300  # rows drawn until the user asks for all

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#20232a;color:#fff;padding:.8em 1.5em}header h1{margin:0;font-size:1.4em}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #ddd;padding:.5em 1.5em}
nav a{margin-right:1.2em;color:#0b57d0;text-decoration:none}
main{padding:0 1.5em 3em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #eee}
th{background:#f0f0f0}td.n,th.n{text-align:right}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#999}
.muted{color:#777}.why{color:#a33}
.filters{display:flex;flex-wrap:wrap;gap:.8em;align-items:center;background:#fff;border:1px solid #ddd;
 padding:.6em;border-radius:6px;margin:.6em 0}
.filters input,.filters select{padding:.25em}
.legend span{margin-right:1em}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{width:220px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;box-sizing:border-box;
 font-size:12px}
.thumb{position:relative;overflow:hidden;margin:0 auto 6px;background:#eee}
.thumb img{display:block;width:100%;height:100%}
.crop{position:absolute;border:2px solid #ffcc00;box-sizing:border-box;box-shadow:0 0 0 999px rgba(0,0,0,.45)}
.nothumb{display:flex;align-items:center;justify-content:center;color:#999;width:200px;height:120px}
.cap{line-height:1.5;margin:4px 0;word-wrap:break-word}
.t{cursor:pointer}.h{background:#dbe8ff;border-radius:3px;padding:0 2px}.tl{background:#dcf3dc;border-radius:3px;padding:0 2px}
s.t{color:#b00}s.folded{color:#c56a00}s.replaced{color:#7a3db8}s.cut{color:#888}
.meta{color:#555;margin:2px 0}.meta b{color:#1d1d1f}
.id{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.prob{display:inline-block;background:#fde2e1;color:#900;border-radius:3px;padding:0 4px;margin:1px 2px 0 0}
.pair{display:flex;gap:12px;align-items:center;margin:8px 0}
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
"""

SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('gallery-data').textContent);
  var PAGE = 120, page = 0, matches = [];
  var grid = document.getElementById('gallery'), pager = document.getElementById('f-pager');
  var tag = document.getElementById('f-tag'), chr = document.getElementById('f-char'),
      prob = document.getElementById('f-prob'), shown = document.getElementById('f-shown');
  var tagIndex = new Map(data.tags.map(function(t, i){ return [t.toLowerCase(), i]; }));
  var TITLES = {folded: 'folded into ', removed: 'removed by the rule ', replaced: 'replaced by ', cut: 'cut by the '};
  function esc(s){ return String(s).replace(/[&<>"']/g, function(c){
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]; }); }
  // As captioning.tags.display_tag: underscores become spaces, except in short emoticons (^_^).
  function norm(s){ s = s.trim().toLowerCase(); return s.length > 3 ? s.replace(/_/g, ' ') : s; }
  function flags(item){
    var f = item.p.slice();
    if (item.mask) f.push('masked');
    if (item.split === 'val') f.push('val');
    if (item.s.some(function(s){ return s[1] !== 'cut'; })) f.push('curated');
    return f;
  }
  function card(item){
    var box = item.box, thumb = item.thumb
      ? '<div class=thumb style="width:' + box[0] + 'px;height:' + box[1] + 'px"><img src="' + esc(item.thumb) +
        '" loading=lazy alt=""><div class=crop style="left:' + item.crop[0] + '%;top:' + item.crop[1] +
        '%;width:' + item.crop[2] + '%;height:' + item.crop[3] + '%"></div></div>'
      : '<div class=nothumb>no thumbnail</div>';
    var tags = function(list, cls){ return list.map(function(i){
      return '<span class="t' + cls + '">' + esc(data.tags[i]) + '</span>'; }); };
    var struck = item.s.map(function(s){
      return '<s class="t ' + esc(s[1]) + '" title="' + esc((TITLES[s[1]] || '') + s[2]) + '">' + esc(data.tags[s[0]]) + '</s>'; });
    var caption = tags(item.h, ' h').concat(tags(item.b, ''), struck, tags(item.t, ' tl')).join(', ');
    var mask = item.mask ? ' · mask <b title="' + esc(item.mask) + '">' + esc(item.mask.split('/').pop()) + '</b>' : '';
    var problems = item.p.map(function(p){ return '<span class=prob>' + esc(data.problems[p]) + '</span>'; }).join('');
    return '<article class=card><div>' + thumb + '</div><p class=cap>' + caption + '</p>' +
      '<p class=meta>bucket <b>' + esc(item.bucket) + '</b> from ' + esc(item.size) + ' · <b>×' + item.rep +
      '</b> repeats · ' + esc(item.split) + ' · ' + item.tok + ' tokens' + mask + '</p>' +
      '<p class="meta id" title="' + esc(item.path) + '">' + esc(item.id) + '</p>' + problems + '</article>';
  }
  function render(){
    var pages = Math.max(1, Math.ceil(matches.length / PAGE));
    page = Math.min(page, pages - 1);
    grid.innerHTML = matches.slice(page * PAGE, (page + 1) * PAGE).map(function(i){ return card(data.items[i]); }).join('');
    shown.textContent = matches.length + ' of ' + data.items.length + ' shown';
    pager.textContent = 'page ' + (page + 1) + ' of ' + pages;
  }
  function apply(){
    var t = norm(tag.value), ti = tagIndex.has(t) ? tagIndex.get(t) : -1, c = chr.value, p = prob.value;
    var ci = c ? data.chars.indexOf(c) : -1;
    matches = [];
    data.items.forEach(function(item, i){
      var ok = (!t || item.h.indexOf(ti) >= 0 || item.b.indexOf(ti) >= 0 || item.t.indexOf(ti) >= 0
                || item.s.some(function(s){ return s[0] === ti; }))
        && (!c || item.c.indexOf(ci) >= 0)
        && (!p || (p === 'any' ? item.p.length > 0 : flags(item).indexOf(p) >= 0));
      if (ok) matches.push(i);
    });
    page = 0; render();
  }
  [tag, chr, prob].forEach(function(el){ el.addEventListener('input', apply); });
  document.getElementById('f-prev').addEventListener('click', function(){ if (page > 0) { page--; render(); } });
  document.getElementById('f-next').addEventListener('click', function(){ page++; render(); });
  document.getElementById('f-clear').addEventListener('click', function(){ tag.value = ''; chr.value = ''; prob.value = ''; apply(); });
  grid.addEventListener('click', function(e){
    var el = e.target;
    if (el.classList && el.classList.contains('t')) { tag.value = el.textContent; apply(); }
  });
  // report.html?tag=blue%20hair&character=...&problem=cut opens with those filters set.
  var query = new URLSearchParams(location.search);
  tag.value = query.get('tag') || ''; chr.value = query.get('character') || ''; prob.value = query.get('problem') || '';
  // The tag table: rows [tag, category, part, captions, share, input, curation], sortable by column.
  var tagRows = JSON.parse(document.getElementById('tag-data').textContent), tagTable = document.getElementById('tag-table');
  var allTags = document.getElementById('tags-all'), tagLimit = TAG_ROWS_SHOWN;
  function drawTags(){
    tagTable.tBodies[0].innerHTML = tagRows.slice(0, tagLimit).map(function(r){
      return '<tr><td>' + esc(r[0]) + '</td><td>' + esc(r[1]) + '</td><td>' + esc(r[2]) + '</td><td class=n>' + r[3] +
        '</td><td class=n>' + Math.round(100 * r[4]) + '%</td><td class=n>' + r[5] + '</td><td>' + esc(r[6]) + '</td></tr>';
    }).join('');
    allTags.hidden = tagRows.length <= tagLimit;
  }
  allTags.addEventListener('click', function(){ tagLimit = tagRows.length; drawTags(); });
  tagTable.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var numeric = th.classList.contains('n'), down = th.dataset.dir !== 'down';
      th.dataset.dir = down ? 'down' : 'up';
      tagRows.sort(function(a, b){
        var r = numeric ? a[col] - b[col] : String(a[col]).localeCompare(String(b[col]));
        return down ? -r : r;
      });
      drawTags();
    });
  });
  drawTags();
  apply();
})();
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_report(stats, data: dict[str, Any], plots: list[tuple[str, str]], out: Path) -> str:
    """The whole page for a `PrepStats` (`stats`), its JSON form (`data`) and the plot files."""
    thumbs = out / THUMBS
    sections = [
        ("summary", "Summary", _summary(stats, data)),
        ("curation", "Curation", _curation(stats)),
        ("gallery", f"Gallery ({len(stats.gallery)})", _gallery(stats, thumbs)),
        ("tags", "Tag frequencies", _tag_table(stats)),
    ]
    if stats.rejected:
        sections.append(("rejected", f"Rejected ({len(stats.rejected)})", _rejected(stats, thumbs)))
    if stats.duplicates:
        sections.append(("duplicates", f"Duplicates ({len(stats.duplicates)})", _duplicates(stats, thumbs)))
    if plots:
        sections.append(("charts", "Charts", "<div class=charts>" + "".join(
            f"<img src='plots/{esc(name)}' alt='{esc(title)}' title='{esc(title)}'>" for title, name in plots)
            + "</div>"))
    nav = "".join(f"<a href='#{key}-section'>{esc(title)}</a>" for key, title, _ in sections)
    body = "".join(f"<section id='{key}-section'><h2>{esc(title)}</h2>{content}</section>"
                   for key, title, content in sections)
    counts = data["counts"]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>animagine-lora prep report</title><style>{STYLE}</style></head><body>"
        f"<header><h1>Dataset prep report</h1><div>{counts['kept']} images kept of {counts['read']} read, "
        f"{counts['rejected']} rejected, {counts['duplicates']} duplicates</div></header>"
        f"<nav>{nav}</nav><main>{body}</main><script>var TAG_ROWS_SHOWN = {TAG_ROWS_SHOWN};{SCRIPT}</script>"
        "</body></html>"
    )


def _rows_table(rows: list[tuple], header: tuple[str, ...] = (), numeric: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th{' class=n' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(header))
    cells = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{esc(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table>{'<tr>' + head + '</tr>' if head else ''}{cells}</table>"


def _summary(stats, data: dict[str, Any]) -> str:
    parts = [_rows_table([(k.replace("_", " "), v) for k, v in data["counts"].items()], numeric=(1,))]
    if data["rejected_by_reason"]:
        parts.append("<h3>Rejected by reason</h3>" + _rows_table(list(data["rejected_by_reason"].items()),
                                                                   ("reason", "files"), (1,)))
    if stats.warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in stats.warnings[:500])
        more = f"<p class=muted>{len(stats.warnings) - 500} more in report.json</p>" if len(stats.warnings) > 500 else ""
        parts.append(f"<details><summary>{len(stats.warnings)} warnings</summary><ul>{items}</ul>{more}</details>")
    return "".join(parts)


def _share(value: float) -> str:
    return f"{100 * value:.0f}%"


def _curation(stats) -> str:
    parts = []
    fold = stats.fold
    if fold is None or not fold.characters:
        parts.append("<p class=muted>No character or trigger tags: nothing to fold.</p>")
    else:
        settings = fold.settings
        exempt = ", ".join(settings.exempt) or "none"
        parts.append(
            f"<p>A general tag in at least <b>{_share(settings.threshold)}</b> of a character's images is folded "
            f"into it (left out of those captions, so the character's tag alone brings it back). "
            f"Characters with fewer than {settings.min_images} images fold nothing. Exempt: {esc(exempt)}."
            + (" <b>--keep-features</b>: nothing is folded." if settings.keep_features else "") + "</p>")
        rows = []
        for name, decision in fold.characters.items():
            def tags(shares: dict[str, float]) -> str:
                return ", ".join(f"{esc(display_tag(t))} <span class=muted>{_share(s)}</span>"
                                 for t, s in shares.items()) or "<span class=muted>none</span>"
            note = f"<div class=why>{esc(decision.note)}</div>" if decision.note else ""
            rows.append(f"<tr><td><b>{esc(display_tag(name))}</b>{note}</td><td class=n>{decision.images}</td>"
                        f"<td>{tags(decision.folded)}</td><td>{tags(decision.kept)}</td><td>{tags(decision.below)}</td></tr>")
        parts.append("<table><tr><th>character / trigger</th><th class=n>images</th><th>folded (share)</th>"
                     "<th>kept at or above the threshold</th><th>most frequent below it</th></tr>"
                     + "".join(rows) + "</table>")
    edits = stats.edits.to_json()
    labels = {"removed": "removed tags", "removed_by_category": "removed by category", "replaced": "replaced",
              "added": "added"}
    # Folded tags are listed per character above; this table counts the edit rules.
    rows = [(labels[kind], tag, count) for kind, counts in edits.items() if kind != "folded"
            for tag, count in counts.items()]
    if rows:
        parts.append("<h3>Tag changes</h3>" + _rows_table(
            [(kind, display_tag(tag) if "->" not in tag else " -> ".join(map(display_tag, tag.split(" -> "))), n)
             for kind, tag, n in rows], ("change", "tag", "captions"), (2,)))
    else:
        parts.append("<p class=muted>No edit rules ([edit] remove_tags, replace_tags, remove_categories, "
                     "add_tags) changed any caption.</p>")
    return "".join(parts)


def gallery_data(items: list[GalleryItem], thumbs: Path) -> dict[str, Any]:
    """The gallery as compact JSON for the page's script: tags and characters as indices into
    vocabularies, thumbnail boxes and crops precomputed (a 10,000-image gallery is a few MB)."""
    vocabulary: dict[str, int] = {}
    characters: dict[str, int] = {}

    def index(tag: str, table: dict[str, int]) -> int:
        return table.setdefault(tag, len(table))

    rows = []
    for item in items:
        scale = THUMB_BOX / max(item.width, item.height)
        has_thumb = (thumbs / item.thumb).is_file()
        rows.append({
            "id": item.id, "path": item.path, "thumb": f"{THUMBS}/{item.thumb}" if has_thumb else None,
            "box": [max(1, round(item.width * scale)), max(1, round(item.height * scale))],
            "crop": [round(v, 2) for v in item.crop_box], "bucket": f"{item.bucket_width}×{item.bucket_height}",
            "size": f"{item.width}×{item.height}", "rep": item.repeats, "split": item.split, "mask": item.mask,
            "tok": item.tokens, "h": [index(t, vocabulary) for t in item.head],
            "b": [index(t, vocabulary) for t in item.body], "t": [index(t, vocabulary) for t in item.tail],
            "s": [[index(s.tag, vocabulary), s.kind, s.detail] for s in item.struck],
            "c": [index(c, characters) for c in item.characters], "p": item.problems,
        })
    return {"tags": list(vocabulary), "chars": list(characters), "problems": PROBLEMS, "items": rows}


def script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no `<` at all, so no tag or file text from a
    dataset can close the element (`</script>`) or open a comment."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def _gallery(stats, thumbs: Path) -> str:
    items: list[GalleryItem] = stats.gallery
    data = gallery_data(items, thumbs)
    problem_counts = Counter(p for item in items for p in item.problems)
    options = "".join(f"<option value='{esc(key)}'>{esc(label)} ({problem_counts[key]})</option>"
                      for key, label in PROBLEMS.items() if problem_counts[key])
    extra = {"masked": "with a loss mask", "val": "validation split", "curated": "tags removed or folded"}
    options += "".join(f"<option value='{key}'>{label}</option>" for key, label in extra.items())
    filters = (
        "<div class=filters>"
        "<label>tag <input id=f-tag list=f-tags placeholder='e.g. blue hair' size=18></label>"
        "<datalist id=f-tags>" + "".join("<option value='" + esc(t) + "'>" for t in sorted(data["tags"]))
        + "</datalist><label>character <select id=f-char><option value=''>all</option>"
        + "".join(f"<option value='{esc(c)}'>{esc(c)}</option>" for c in sorted(data["chars"]))
        + "</select></label><label>problem <select id=f-prob><option value=''>all images</option>"
        "<option value=any>any problem</option>" + options + "</select></label>"
        "<button id=f-clear type=button>clear</button><span id=f-shown class=muted></span>"
        "<button id=f-prev type=button>&lt;</button><span id=f-pager class=muted></span>"
        "<button id=f-next type=button>&gt;</button></div>"
        "<p class='legend muted'><span class='h'>head</span><span>body (shuffled in training)</span>"
        "<span class='tl'>tail</span><s class='t folded'>folded</s> <s class=t>removed</s> "
        "<s class='t replaced'>replaced</s> <s class='t cut'>cut by the token budget</s>"
        "<span>· the yellow box is the crop that is trained · click a tag to filter</span></p>"
    )
    more = ""
    if stats.kept > len(items):
        more = (f"<p class=why>The gallery shows the first {len(items)} of {stats.kept} kept images "
                f"(at most {GALLERY_MAX}); report.json and the dataset hold them all.</p>")
    return (filters + more + "<noscript><p class=why>The gallery needs JavaScript.</p></noscript>"
            "<div id=gallery class=grid></div>"
            f"<script id=gallery-data type='application/json'>{script_json(data)}</script>")


def _tag_table(stats) -> str:
    category_of: dict[str, str] = {}
    inputs: Counter = Counter()
    for category, counter in stats.tags_in_order():
        for name, count in counter.items():
            display = display_tag(name)
            inputs[display] += count
            category_of.setdefault(display, category)
    folded_into: dict[str, list[str]] = {}
    if stats.fold is not None:
        for character, decision in stats.fold.characters.items():
            for tag in decision.folded:
                folded_into.setdefault(display_tag(tag), []).append(display_tag(character))
    edits = stats.edits
    removed = Counter({display_tag(t): n for t, n in edits.removed.items()})
    added = Counter({display_tag(t): n for t, n in edits.added.items()})
    replaced: dict[str, list[str]] = {}
    for pair, n in edits.replaced.items():
        old, new = pair.split(" -> ")
        replaced.setdefault(display_tag(new), []).append(f"replaces {display_tag(old)} in {n}")
        replaced.setdefault(display_tag(old), []).append(f"replaced by {display_tag(new)} in {n}")
    kept = max(stats.kept, 1)
    names = sorted(set(stats.caption_tags) | set(inputs), key=lambda t: (-stats.caption_tags[t], -inputs[t], t))
    rows = []
    for name in names[:TAG_TABLE_MAX]:
        notes = []
        if name in folded_into:
            notes.append("folded into " + ", ".join(folded_into[name]))
        if removed[name]:
            notes.append(f"removed from {removed[name]}")
        if stats.cut_tags[name]:
            notes.append(f"cut from {stats.cut_tags[name]}")
        notes += replaced.get(name, []) + ([f"added to {added[name]}"] if added[name] else [])
        if category_of.get(name) in edits.removed_by_category:
            notes.append(f"removed with every {category_of[name]} tag")
        source = "added by an edit rule" if name in replaced or added[name] else "added by the profile"
        count = stats.caption_tags[name]
        rows.append([name, category_of.get(name, source), stats.tag_parts.get(name, "-"), count,
                     round(count / kept, 4), inputs[name], "; ".join(notes)])
    more = f"<p class=muted>The {TAG_TABLE_MAX} most frequent of {len(names)} tags.</p>" if len(names) > TAG_TABLE_MAX else ""
    # Rows come from JSON and are drawn by the script (the first TAG_ROWS_SHOWN until "show all"):
    # thousands of static rows cost more to lay out than the whole gallery page.
    return (
        "<p class=muted>Click a column to sort. <i>captions</i>: kept images whose final caption has the tag; "
        "<i>input</i>: images whose tags had it before curation.</p>" + more
        + "<table class=sortable id=tag-table><thead><tr><th>tag</th><th>category</th><th>part</th>"
        "<th class=n>captions</th><th class=n>share</th><th class=n>input</th><th>curation</th></tr></thead>"
        "<tbody></tbody></table>"
        f"<button id=tags-all type=button hidden>show all {len(rows)} tags</button>"
        f"<script id=tag-data type='application/json'>{script_json(rows)}</script>"
    )


def _rejected(stats, thumbs: Path) -> str:
    rows = []
    for index, (path, reason) in enumerate(stats.rejected[:5000]):
        name = stats.rejected_thumbs.get(index)
        image = ""
        if name and (thumbs / name).is_file():
            image = f"<img src='{THUMBS}/{esc(name)}' loading=lazy alt='' style='max-width:96px;max-height:96px'>"
        rows.append(f"<tr><td>{image}</td><td>{esc(path)}</td><td class=why>{esc(reason)}</td></tr>")
    return "<table><tr><th></th><th>file</th><th>reason</th></tr>" + "".join(rows) + "</table>"


def _duplicates(stats, thumbs: Path) -> str:
    pairs = []
    for dropped, kind, kept in stats.duplicates[:2000]:
        def side(record_id: str, label: str) -> str:
            name = thumb_name(record_id)
            image = (f"<img src='{THUMBS}/{esc(name)}' loading=lazy alt='' style='max-width:200px;max-height:200px'>"
                     if (thumbs / name).is_file() else "<div class=nothumb>no thumbnail</div>")
            return f"<div class=card><div><b>{label}</b></div>{image}<p class=meta>{esc(record_id)}</p></div>"
        pairs.append(f"<div class=pair>{side(dropped, 'dropped')}<div class=why>{esc(kind)} of →</div>"
                     f"{side(kept, 'kept')}</div>")
    return "".join(pairs)
