// core/report-svg: the rank picture is one SVG document, names escaped,
// panels in natural name order, degenerate spectra drawn without NaN.
#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "core/report-svg.h"

using namespace lora;

namespace {
size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}
}  // namespace

TEST_CASE("one document, one panel per module, names escaped, layers in numeric order") {
  rank_figure fig;
  fig.title = "extract: a & b";
  fig.subtitle = "line one\nline <two>";
  fig.panels.push_back({"model.layers.10.q", {3, 2, 1}, 14, 2, 0, 8, 8, 4, 1 / std::sqrt(14.0)});
  fig.panels.push_back({"model.layers.2.q", {3, 2, 1}, 14, 1, 0, 8, 8, 4, std::sqrt(5 / 14.0)});
  fig.panels.push_back({"a<b>&\"c\"", {}, 0, 0, 0, 4, 4, 2, 0});  // empty spectrum
  fig.panels.push_back({"z", {1, 0, std::nan(""), INFINITY}, 1, 1, 2, 4, 4, 2, 0});
  const std::string svg = render_rank_svg(fig);
  CHECK(svg.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\""));
  CHECK(svg.ends_with("</svg>\n"));
  CHECK(count(svg, "<svg") == 1);
  CHECK(count(svg, "]  rank") == 4);
  CHECK(svg.find("a &amp; b") != std::string::npos);
  CHECK(svg.find("line &lt;two&gt;") != std::string::npos);
  CHECK(svg.find("a&lt;b&gt;&amp;&quot;c&quot;") != std::string::npos);
  CHECK(svg.find("a<b>") == std::string::npos);
  CHECK(svg.find("nan") == std::string::npos);
  CHECK(svg.find("inf") == std::string::npos);
  // layers.2 is drawn before layers.10
  CHECK(svg.find("model.layers.2.q  [") < svg.find("model.layers.10.q  ["));
}
