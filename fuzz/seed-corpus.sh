#!/usr/bin/env bash
# Seeds fuzz/corpus/decode_saved (gitignored) from the format's golden files, as-is for the raw
# decoders and behind the mode byte decode_saved.rs uses for its sealed variants.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
golden="$here/../tests/golden"
corpus="$here/corpus/decode_saved"
mkdir -p "$corpus"
for f in "$golden"/*.bin; do
    name="$(basename "$f" .bin)"
    cp "$f" "$corpus/$name"
    case "$name" in
        delivery_*) mode='\x00' ;;
        channel_*) mode='\x01' ;;
        stream_*) mode='\x04' ;;
    esac
    { printf "$mode"; cat "$f"; } > "$corpus/sealed_$name"
done
echo "seeded $(ls "$corpus" | wc -l) inputs into $corpus"

# The inspector of `vmbsrvctl inspect`: a real save stream (vmbsrvctl --sim demo) and the
# format's golden streams.
inspect_corpus="$here/corpus/inspect"
mkdir -p "$inspect_corpus"
cp "$here/../crates/vmbsrvctl/tests/fixtures/demo.vbss" "$inspect_corpus/demo"
for f in "$golden"/stream_*.bin; do
    [ -e "$f" ] && cp "$f" "$inspect_corpus/$(basename "$f" .bin)"
done
echo "seeded $(ls "$inspect_corpus" | wc -l) inputs into $inspect_corpus"
