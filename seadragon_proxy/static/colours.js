// Colours per source, derived from the source's name alone: a source has the same colour on
// every page load, in every browser and in every chart, whatever order sources appear in.
"use strict";

// FNV-1a (32 bits) of the name, then a final avalanche so similar names ("chat", "chats")
// land far apart. Bits 2 and up pick the hue, the number mod 3 one of three lightnesses, so
// two names must agree in both to look alike; all three read on the page's white background.
// (Of the bit choices tried, this one puts the shipped names coding, chat, scripts,
// direct_api and "(none)" at least 42 degrees apart.)
function seadragonColour(name) {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) {
    h ^= name.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  const u = h >>> 0;
  const lightness = [34, 44, 54][u % 3];
  return `hsl(${(u >>> 2) % 360} 62% ${lightness}%)`;
}
