"""Pure-Python copy of the tokenisation the COCO caption evaluation runs before scoring.

``pycocoevalcap/tokenizer/ptbtokenizer.py`` (salaniz/pycocoevalcap 1.2, as coco-caption) writes every caption
on one line and runs Stanford CoreNLP 3.4.1's ``edu.stanford.nlp.process.PTBTokenizer -preserveLines
-lowerCase`` over the file (Java), then drops the tokens in its ``PUNCTUATIONS`` list. This module re-states
the rules of that release's lexer (``src/edu/stanford/nlp/process/PTBLexer.flex`` at tag v3.4.1, default
options plus ``tokenizeNLs``) as Python regular expressions, tried JFlex-style: at each position the
longest match of any rule (its trailing context counted) wins, ties going to the earlier rule; JFlex's
``%caseless`` makes literal words caseless while character classes such as ``[A-Z]`` keep their case.
Tokens that only differ in how a removed punctuation token is written (``''`` vs ``"``, a doubled sentence
final ``.``) are not re-stated. Lower-casing happens after lexing (``-lowerCase``), so ``(`` becomes
``-lrb-``, which the ``PUNCTUATIONS`` list (``-LRB-``) does not remove: the official pipeline keeps it.

Known gaps (none in ordinary captions): characters outside the Basic Multilingual Plane are deleted, as
the Java lexer (UTF-16, BMP classes) deletes them; Unicode letters follow Python's ``str.isalpha``, not
the JDK 7 tables the lexer was generated with. ``bench/caption_metrics_vs_official.py`` measures the
match against the real Java tokenizer.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence

_LOOKAHEAD = 64  # characters of the next line that a rule's trailing context can reach
# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after the Java tokenizer ran
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def _ranges(predicate) -> str:
    """Regex character-class body of the Basic Multilingual Plane code points where ``predicate`` holds."""
    parts, start = [], None
    for cp in range(0x10000):
        inside = not 0xD800 <= cp <= 0xDFFF and predicate(chr(cp))
        if inside and start is None:
            start = cp
        if not inside and start is not None:
            parts.append((start, cp - 1))
            start = None
    if start is not None:
        parts.append((start, 0xFFFF))
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in parts)


@functools.cache
def _rules() -> list[tuple[str, re.Pattern, str | None]]:
    """``(kind, pattern, extra)`` in the lexer's rule order. Each pattern has a group ``t`` (the token
    text, JFlex's ``yytext``) and may go on with trailing context that counts for the longest match."""
    letter_cls = _ranges(str.isalpha)
    digit = "[" + _ranges(str.isdecimal) + "\u07c0-\u07c9]"
    L = "[" + letter_cls + "]"
    letter = ("(?:[" + letter_cls + "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f"
              "\u0370-\u037d\u0384\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525"
              "\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f"
              "\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f"
              "\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963"
              "\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c"
              "\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd"
              "\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc"
              "\u0ec8-\u0ecd]|&[aeiouAEIOU](?i:acute|grave|uml);)")
    m = {
        "SPACE": "[ \t\u00a0\u2000-\u200a\u3000]",
        "NEWLINE": "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c\u0085])",
        "APOS": "(?:['\u0092\u2019]|(?i:&apos;))",
        "HYPHEN": "[-_\u058a\u2010\u2011]",
        "INSENTP": "[,;:\u3001]",
    }
    m["SPACENL"] = f"(?:{m['SPACE']}|{m['NEWLINE']})"
    m["APOSETC"] = f"(?:{m['APOS']}|[`\u0091\u2018\u201b])"
    sgml = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
            r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
    word = f"{letter}(?:{letter}|{digit})*(?:[.!?]{letter}(?:{letter}|{digit})*)*"
    num = f"(?:{digit}*(?:[.:,\u00ad\u066b\u066c]{digit}+)+|{digit}+)"
    acro_words = r"(?i:Canada|Sino|Korean|EU|Japan|non)-(?i:U\.S)|(?i:U\.S\.-(?:U\.S\.S\.R|U\.K))"
    acro = rf"(?:{acro_words}|[A-Za-z](?:\.[A-Za-z])*)"
    acro2 = rf"(?:{acro_words}|[A-Za-z](?:\.[A-Za-z])+)"
    apos, apx, sp, spnl = m["APOS"], m["APOSETC"], m["SPACE"], m["SPACENL"]
    redaux = f"{apos}(?:[msdMSD]|(?i:re|ve|ll))"
    sredaux = f"(?i:n){apx}(?i:t)"
    ld = f"(?:{L}|{digit})"
    thing = f"(?:[dDoOlL]{apx}{ld})?{ld}+(?:{m['HYPHEN']}(?:[dDoOlL]{apx}{ld})?{ld}+)*"
    hthing = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{acro2}\.|[A-Za-z0-9\u00ad]+))+"
    thinga = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
    apoword = (f"(?:{apos}(?i:n){apos}?|[lLdDjJ]{apos}|(?i:dunkin){apos}|(?i:somethin){apos}|(?i:ol){apos}"
               f"|{apos}(?i:em)|[A-HJ-XZn]{apx}{L}{{2}}{L}*|{apos}[2-9]0(?i:s)|{apos}(?i:till?)"
               f"|{L}{L}*[aeiouyAEIOUY]{apx}[aeiouA-Z]{L}*|{apos}(?i:cause)|(?i:cont'd\\.?|'twas|nor'easter"
               f"|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|[Oo]{apx}[Oo])")
    abbrev1 = (r"(?:(?i:Sept|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Oct|Nov|Dec|Tues|Thurs|Mon|Tue|Wed|Thu|Fri"
               r"|Ariz|Ala|Calif|Colo|Conn|Ct|Dak|Fla|Ga|Ind|Kans|Kan|Ky|Md|Mich|Minn|Mont|Mo|Neb|Nev|Okla"
               r"|Penn|Tenn|Va|Vt|Wisc|Wis|Wyo|Inc|Cos|Co|Corp|Ppty|Ppte|Ppts|Ppte?s?|Pt[ye]s?|Ltd|Plc|Rt"
               r"|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq|Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq"
               r"|Bldg)|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))\.")
    abbrev4 = (r"(?:(?i:Mrs|Mr|Ms|Drs|Dr|Profs|Prof|Sens|Sen|Reps|Rep|Attys|Atty|Lt|Col|Gen|Messrs|Govs|Gov"
               r"|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt|Ste|St|Ave|Pres|Lieut|Hon|Brig|Comdr|Cmdr|Pfc|Spc|Supts|Supt|Det"
               r"|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph"
               r"|Invt|Elec|Natl|Mfg|Mtg|Dept)|M(?i:iss)|" + acro + ")")
    after_acronym = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It"
                     "|Last|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their"
                     "|Then|There|These|They|This|We|When|While|What|Yet|You")
    after_acronym = "|".join(f"{w[0]}(?i:{w[1:]})" if len(w) > 1 else w for w in after_acronym.split("|"))
    file_ext = ("bat|bmp|class|cgi|cpp|dll|docx|doc|exe|gif|gz|html|htm|h|jar|java|jpeg|jpg|mov|mp3|pdf|php"
                "|pl|png|ppt|ps|py|sql|tar|txt|wav|xml|x|zip|c")
    phone = (r"(?:(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])[0-9]{3,4}"
             r"[\- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5})")
    quotes = (f"(?:''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a"
              f"\u00ab\u00bb]{{1,2}}|{apos})")
    misc = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0"
            "\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d"
            "\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b"
            "\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb"
            "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
    rules = [  # (kind, token regex, trailing context regex, extra)
        ("keep", r"(?i:c\+\+|[cf]#)", "", None),
        ("push3", "(?i:cannot)", "", None),
        ("push3", "(?i:'twas)", "", None),
        ("push2", "(?i:'tis)", "", None),
        ("push2", "(?i:gonna|gotta|lemme|gimme|wanna)", "", None),
        ("sgml", sgml, "", None),
        ("map", "(?i:&(?:MD|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", "", "--"),
        ("amp", "(?i:&amp;)", "", None),
        ("keep", "(?i:&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);)", "", None),
        ("word", word, redaux, None),
        ("word", r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", sredaux, None),
        ("word", word, "", None),
        ("keep", apoword, "", None),
        ("keep", f"(?i:y){apos}", L, None),
        ("keep", r"(?i:https?://)[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", "", None),
        ("keep", r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},"
                 r"\-_$]+\.)+(?i:com|net|org|edu)))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", "", None),
        ("keep", r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
                 r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:(?i:&gt;)|>)?", "", None),
        ("keep", f"@[a-zA-Z_][a-zA-Z_0-9]*|#{letter}+", "", None),
        ("quote", redaux, "[^A-Za-z]", False),
        ("quote", sredaux, "[^A-Za-z]", False),
        ("keep", f"{digit}{{1,2}}[\\-/]{digit}{{1,2}}[\\-/]{digit}{{2,4}}", "", None),
        ("soft", f"[\\-+]?{num}", "", None),
        ("keep", "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", "", None),
        ("nbsp", f"(?:{digit}{{1,4}}[- \u00a0])?{digit}{{1,4}}(?:\\\\?/|\u2044){digit}{{1,4}}", "", None),
        ("frac", "[\u00bc\u00bd\u00be\u2153-\u215e]", "", None),
        ("amp", r"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls)"
                f"|(?i:Cap){apos}(?i:n)|(?i:c){apos}(?i:est)", "", None),
        ("keep", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", "", None),
        ("keep", r"[A-Z]*\$|#", "", None),
        ("currency", "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
         "", None),
        ("acronym", f"{acro}\\.", f"{spnl}+(?:{after_acronym}|{sgml}){spnl}", None),
        ("keep", r"(?i:ca|figs|fig|prop|nos|no|art|bldg|pp|op)\.", f"{spnl}?{digit}", None),
        ("keep", r"(?:[Pp][Tt][eyEY]|(?i:co))\.", f"{sp}(?i:ltd|lim)", None),
        ("keep", abbrev1, "(?s:..)", None),  # ABBREV1/{SENTEND} and ABBREV1/[^][^]: the same token
        ("keep", abbrev1, "", None),
        ("keep", abbrev4 + r"\.", "", None),
        ("keep", abbrev4, sp, None),
        ("keep", acro, spnl, None),
        ("keep", f"{apos}[0-9][0-9]", spnl, None),
        ("keep", f"(?:{letter}|{digit})+(?:[.](?:{letter}|{digit})+)*[.](?i:{file_ext})", f"(?:{spnl}|[.?!,])",
         None),
        ("soft", word + r"\.", m["INSENTP"], None),
        ("phone", phone, "", None),
        ("quote", "\"|(?i:&quot;)", "[A-Za-z0-9$]", True),
        ("quote", "\"|(?i:&quot;)", "", False),
        ("drop", "\x7f", "", None),
        ("map", "<|(?i:&lt;)", "", "<"),
        ("map", ">|(?i:&gt;)", "", ">"),
        ("paren", "[<>]?[:;=][\\-o*']?[()DPdpO\\\\{@|\\[\\]]", "[^A-Za-z0-9]", None),
        ("paren", r"[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
                  r"|\([\^x=~<>']-[\^x=~<>'`]\)", "", None),
        ("map", r"\{", "", "-LCB-"),
        ("map", r"\}", "", "-RCB-"),
        ("map", r"\[", "", "-LSB-"),
        ("map", r"\]", "", "-RSB-"),
        ("map", r"\(", "", "-LRB-"),
        ("map", r"\)", "", "-RRB-"),
        ("dashes", r"-+", "", None),
        ("map", "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", "", "..."),
        ("keep", "@+|#+|_+", "", None),
        ("keep", r"\*+|(?:\\\*){1,3}", "", None),
        ("keep", m["INSENTP"], "", None),
        ("keep", "[?!]+", "", None),
        ("keep", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", "", None),
        ("keep", "=", "", None),
        ("keep", "/", "", None),
        ("soft", hthing + r"\.", m["INSENTP"], None),
        ("soft", hthing, "", None),
        ("keep", thing + r"\.", m["INSENTP"], None),
        ("keep", thing, "", None),
        ("amp", thinga + r"\.", m["INSENTP"], None),
        ("amp", thinga, "", None),
        ("quote", "'", "[A-Za-z][^ \t\n\r\u00a0]", True),
        ("quote", redaux, "", False),
        ("quote", sredaux, "", False),
        ("quote", quotes, "", False),
        ("keep", "<<|>>", "", None),
        ("keep", misc, "", None),
        ("drop", f"\0|{sp}+|[\u200b\u200e\u200f\ufeff]|{m['NEWLINE']}|(?i:&nbsp;)", "", None),
        ("drop", "(?s:.)", "", None),  # untokenizable: deleted (the default "firstDelete")
    ]
    return [(kind, re.compile(f"(?P<t>{tok})(?:{ctx})"), extra) for kind, tok, ctx, extra in rules]


_LEFT_QUOTES = str.maketrans({"\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`",
                              "\u0092": "'", "\u2019": "'", "\u203a": "'"})
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _latex_quotes(tok: str, probably_left: bool) -> str:
    """PTBLexer.latexQuotes: ASCII quotes by guessed side, curly ones by their own side."""
    single, double = ("`", "``") if probably_left else ("'", "''")
    tok = re.sub("&apos;|'", single, tok)
    tok = re.sub('"|&quot;', double, tok)
    tok = tok.translate(_LEFT_QUOTES)
    return re.sub("[\u0093\u201c\u00ab]", "``", re.sub("[\u0094\u201d\u00bb]", "''", tok))


def _emit(kind: str, text: str, extra) -> tuple[str | None, int]:
    """(token or None, characters consumed) of one matched rule, as the lexer's action does it."""
    if kind == "keep":
        return text, len(text)
    if kind == "drop":
        return None, len(text)
    if kind in ("word", "soft"):
        return text.replace("\u00ad", "") or "-", len(text)
    if kind == "push3":
        return text[:-3], len(text) - 3
    if kind == "push2":
        return text[:-2], len(text) - 2
    if kind == "map":
        return extra, len(text)
    if kind == "amp":
        return re.sub("(?i:&amp;)", "&", text), len(text)
    if kind == "quote":
        return _latex_quotes(text, extra), len(text)
    if kind in ("sgml", "nbsp"):
        return text.replace(" ", "\u00a0"), len(text)
    if kind == "frac":
        return _FRACTIONS.get(text, text), len(text)
    if kind == "currency":
        out = text.replace("\u00a2", "cents").replace("\u00a3", "#")
        return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", out), len(text)
    if kind in ("phone", "paren"):
        out = text.replace(" ", "\u00a0") if kind == "phone" else text
        return out.replace("(", "-LRB-").replace(")", "-RRB-"), len(text)
    if kind == "dashes":
        return ("--" if 3 <= len(text) <= 4 else text), len(text)
    if kind == "acronym":  # "I." -> "I" (the period comes next); "U.S." stays whole (and a period follows)
        return (text[:-1], 1) if len(text) == 2 else (text, len(text) - 1)
    raise AssertionError(f"unknown rule kind {kind}")


def _bmp_only(text: str) -> str:
    """Characters past U+FFFF become NUL (deleted): the Java lexer sees two untokenizable surrogates."""
    return "".join(ch if ord(ch) < 0x10000 else "\x00" for ch in text)


def ptb_lex(text: str, next_line: str | None = None) -> list[str]:
    """Tokens of one line as CoreNLP 3.4.1's PTBLexer (default options) returns them, before lower-casing
    and punctuation removal. ``next_line``: the line that follows it in the file (None: the end of the
    file follows); a few rules look past the newline (a one-letter acronym before "The" loses its period)."""
    line = _bmp_only(text)
    full = line if next_line is None else line + "\n" + _bmp_only(next_line[:_LOOKAHEAD])
    rules = _rules()
    tokens, pos = [], 0
    while pos < len(line):
        best, best_len = None, -1
        for kind, pattern, extra in rules:
            match = pattern.match(full, pos)
            if match is not None and match.end() - pos > best_len:
                best, best_len = (kind, match.group("t"), extra), match.end() - pos
        token, consumed = _emit(*best)
        if token is not None:
            tokens.append(token)
        pos += max(consumed, 1)
    return tokens


def ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """Captions tokenised as one pycocoevalcap ``PTBTokenizer.tokenize`` call does: one line each (newlines
    become spaces), in this order, with the following line as the lexer's look-ahead; PTB tokens,
    lower-cased (Java's ``toLowerCase(Locale.ENGLISH)``), joined by spaces, ``PUNCTUATIONS`` removed."""
    lines = [c.replace("\n", " ") for c in captions]
    out = []
    for i, line in enumerate(lines):
        lexed = " ".join(tok.lower() for tok in ptb_lex(line, lines[i + 1] if i + 1 < len(lines) else None))
        out.append(" ".join(w for w in lexed.rstrip().split(" ") if w not in PUNCTUATIONS))
    return out


def ptb_tokenize(text: str) -> str:
    """One caption as pycocoevalcap's PTBTokenizer gives it when tokenised on its own."""
    return ptb_tokenize_lines([text])[0]
