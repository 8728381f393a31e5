#include "core/report-svg.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <string_view>

#include <fmt/format.h>

namespace lora {

namespace {

constexpr double page_width = 1100;
constexpr double margin = 20;

std::string escape(const std::string& in) {
  std::string out;
  for (char c : in) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// A plot area: data (x0..x1, y0..y1) onto pixels (left..left+w, top+h..top).
struct frame {
  double left, top, w, h;
  double x0, x1, y0, y1;
  double px(double x) const { return left + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * w; }
  double py(double y) const { return top + h - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * h; }
};

void axes(std::string& out, const frame& f) {
  out += fmt::format(R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="#fafafa" stroke="#999"/>)"
                     "\n",
                     f.left, f.top, f.w, f.h);
}

void text(std::string& out, double x, double y, const std::string& s, const char* extra = "") {
  out += fmt::format(R"(<text x="{:.1f}" y="{:.1f}"{}>{}</text>)"
                     "\n",
                     x, y, extra, escape(s));
}

void polyline(std::string& out, const std::vector<std::pair<double, double>>& pts, const char* style) {
  if (pts.empty()) return;
  out += R"(<polyline fill="none" )";
  out += style;
  out += R"( points=")";
  for (const auto& [x, y] : pts) out += fmt::format("{:.1f},{:.1f} ", x, y);
  out += "\"/>\n";
}

void vline(std::string& out, const frame& f, double x, const char* style) {
  out += fmt::format(R"(<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" {}/>)"
                     "\n",
                     f.px(x), f.top, f.px(x), f.top + f.h, style);
}

// Ranks (bars, left axis) and relative errors (red line, right axis) across
// the modules; returns the height used.
double overview(std::string& out, const rank_figure& fig, double top) {
  const size_t n = fig.panels.size();
  int64_t max_rank = 1;
  double max_error = 0;
  for (const auto& p : fig.panels) {
    max_rank = std::max({max_rank, p.rank, p.rank_in});
    max_error = std::max(max_error, p.error);
  }
  if (!(max_error > 0)) max_error = 1;
  const frame f{margin + 50,
                top + 20,
                page_width - 2 * margin - 100,
                170,
                0,
                static_cast<double>(n),
                0,
                static_cast<double>(max_rank)};
  const bool any_in =
      std::any_of(fig.panels.begin(), fig.panels.end(), [](const rank_panel& p) { return p.rank_in > 0; });
  text(out, margin, top + 12,
       fmt::format("Overview: rank per module (bars{}, left axis) and relative error (red, right axis)",
                   any_in ? "; light: the rank before" : ""),
       R"( font-weight="bold")");
  axes(out, f);
  text(out, f.left - 6, f.top + 10, fmt::format("{}", max_rank), R"( text-anchor="end")");
  text(out, f.left - 6, f.top + f.h, "0", R"( text-anchor="end")");
  text(out, f.left + f.w + 6, f.top + 10, fmt::format("{:.3g}", max_error), R"( fill="#c0392b")");
  text(out, f.left + f.w + 6, f.top + f.h, "0", R"( fill="#c0392b")");
  const double bar = f.w / std::max<double>(1.0, static_cast<double>(n));
  std::vector<std::pair<double, double>> errors;
  for (size_t i = 0; i < n; ++i) {
    const rank_panel& p = fig.panels[i];
    const double x = f.left + bar * static_cast<double>(i);
    if (p.rank_in > 0)
      out += fmt::format(
          R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="#d6e4f0"><title>{} rank in {}</title></rect>)"
          "\n",
          x + bar * 0.1, f.py(static_cast<double>(p.rank_in)), bar * 0.8,
          f.top + f.h - f.py(static_cast<double>(p.rank_in)), escape(p.name), p.rank_in);
    out += fmt::format(
        R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="#2e86c1"><title>{}: rank {}, error {:.3g}</title></rect>)"
        "\n",
        x + bar * 0.2, f.py(static_cast<double>(p.rank)), bar * 0.6, f.top + f.h - f.py(static_cast<double>(p.rank)),
        escape(p.name), p.rank, p.error);
    errors.push_back({x + bar * 0.5, f.top + f.h - p.error / max_error * f.h});
    // module label, rotated under the axis
    out += fmt::format(
        R"svg(<text x="{0:.1f}" y="{1:.1f}" font-size="9" text-anchor="end" transform="rotate(-60 {0:.1f} {1:.1f})">{2}</text>)svg"
        "\n",
        x + bar * 0.5, f.top + f.h + 10, escape(p.name));
  }
  polyline(out, errors, R"(stroke="#c0392b" stroke-width="1.5")");
  for (const auto& [x, y] : errors)
    out += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="2.5" fill="#c0392b"/>)"
                       "\n",
                       x, y);
  size_t longest = 0;
  for (const auto& p : fig.panels) longest = std::max(longest, p.name.size());
  return 20 + f.h + 20 + std::min<double>(300, 5.0 * static_cast<double>(longest));
}

// One module: spectrum (log10 s_i against i) and energy kept against rank.
void panel(std::string& out, const rank_panel& p, double left, double top, double width) {
  text(out, left, top + 12,
       fmt::format("{}  [{}x{}]  rank {}{}  error {:.3g}", p.name, p.rows, p.cols,
                   p.rank_in > 0 ? fmt::format("{} -> ", p.rank_in) : std::string(), p.rank, p.error),
       R"( font-size="11" font-weight="bold")");
  const double plot_w = (width - 70) / 2, plot_h = 110, plot_top = top + 22;

  // spectrum, log scale
  std::vector<std::pair<double, double>> pts;
  double lo = 0, hi = 0;
  bool any = false;
  for (double v : p.s)
    if (std::isfinite(v) && v > 0) {
      const double l = std::log10(v);
      lo = any ? std::min(lo, l) : l;
      hi = any ? std::max(hi, l) : l;
      any = true;
    }
  if (!any) lo = 0, hi = 1;
  lo = std::floor(lo), hi = std::ceil(hi);
  if (hi <= lo) hi = lo + 1;
  const double n = static_cast<double>(std::max<size_t>(p.s.size(), 1));
  const frame fs{left + 35, plot_top, plot_w, plot_h, 1, std::max(2.0, n), lo, hi};
  axes(out, fs);
  for (size_t i = 0; i < p.s.size(); ++i)
    if (std::isfinite(p.s[i]) && p.s[i] > 0)
      pts.push_back({fs.px(static_cast<double>(i + 1)), fs.py(std::log10(p.s[i]))});
  polyline(out, pts, R"(stroke="#2e86c1" stroke-width="1.5")");
  if (p.rank > 0) vline(out, fs, static_cast<double>(p.rank), R"(stroke="#c0392b" stroke-dasharray="4,3")");
  if (p.break_even > 0 && static_cast<double>(p.break_even) <= fs.x1)
    vline(out, fs, static_cast<double>(p.break_even), R"(stroke="#888" stroke-dasharray="1,3")");
  text(out, fs.left - 4, fs.top + 9, fmt::format("1e{:g}", hi), R"( font-size="9" text-anchor="end")");
  text(out, fs.left - 4, fs.top + fs.h, fmt::format("1e{:g}", lo), R"( font-size="9" text-anchor="end")");
  text(out, fs.left, fs.top + fs.h + 12, "singular values s_i (log) vs i", R"( font-size="9")");
  text(out, fs.left + fs.w, fs.top + fs.h + 12, fmt::format("{}", p.s.size()), R"( font-size="9" text-anchor="end")");

  // energy kept against rank
  const frame fe{left + 35 + plot_w + 35, plot_top, plot_w, plot_h, 0, std::max(1.0, n), 0, 1};
  axes(out, fe);
  std::vector<std::pair<double, double>> cum{{fe.px(0), fe.py(0)}};
  double kept = 0, at_rank = 0;
  for (size_t i = 0; i < p.s.size(); ++i) {
    kept += p.s[i] * p.s[i];
    const double frac = p.total_energy > 0 ? std::min(1.0, kept / p.total_energy) : 1.0;
    cum.push_back({fe.px(static_cast<double>(i + 1)), fe.py(frac)});
    if (static_cast<int64_t>(i + 1) == p.rank) at_rank = frac;
  }
  polyline(out, cum, R"(stroke="#27ae60" stroke-width="1.5")");
  if (p.rank > 0) {
    if (p.rank > static_cast<int64_t>(p.s.size())) at_rank = 1 - p.error * p.error;
    vline(out, fe, static_cast<double>(p.rank), R"(stroke="#c0392b" stroke-dasharray="4,3")");
    out += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="3.5" fill="#c0392b"/>)"
                       "\n",
                       fe.px(static_cast<double>(p.rank)), fe.py(at_rank));
    // the label sits right of the marker, or left of it near the right edge
    const bool left_of = fe.px(static_cast<double>(p.rank)) > fe.left + 0.7 * fe.w;
    text(out, fe.px(static_cast<double>(p.rank)) + (left_of ? -5 : 5), fe.py(at_rank) + 12,
         fmt::format("r={} {:.3f}", p.rank, at_rank),
         left_of ? R"( font-size="9" fill="#c0392b" text-anchor="end")" : R"( font-size="9" fill="#c0392b")");
  }
  text(out, fe.left - 4, fe.top + 9, "1", R"( font-size="9" text-anchor="end")");
  text(out, fe.left - 4, fe.top + fe.h, "0", R"( font-size="9" text-anchor="end")");
  text(out, fe.left, fe.top + fe.h + 12, "energy kept vs rank", R"( font-size="9")");
  text(out, fe.left + fe.w, fe.top + fe.h + 12, fmt::format("{}", p.s.size()), R"( font-size="9" text-anchor="end")");
}

// Compares names with their digit runs read as numbers ("layers.2" < "layers.10").
bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) && std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      const std::string_view da = std::string_view(a).substr(i, ie - i), db = std::string_view(b).substr(j, je - j);
      const size_t za = da.find_first_not_of('0'), zb = db.find_first_not_of('0');
      const std::string_view na = za == std::string_view::npos ? "" : da.substr(za);
      const std::string_view nb = zb == std::string_view::npos ? "" : db.substr(zb);
      if (na.size() != nb.size()) return na.size() < nb.size();
      if (na != nb) return na < nb;
      i = ie, j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i, ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

}  // namespace

std::string render_rank_svg(const rank_figure& input) {
  rank_figure fig = input;
  std::stable_sort(fig.panels.begin(), fig.panels.end(),
                   [](const rank_panel& a, const rank_panel& b) { return natural_less(a.name, b.name); });
  std::string body;
  double y = margin;
  text(body, margin, y + 14, fig.title, R"( font-size="16" font-weight="bold")");
  size_t start = 0;
  for (;;) {
    const size_t end = fig.subtitle.find('\n', start);
    y += 16;
    text(body, margin, y + 16, fig.subtitle.substr(start, end - start), R"( font-size="12")");
    if (end == std::string::npos) break;
    start = end + 1;
  }
  text(body, margin, y + 32,
       "Per module: spectrum (blue, log scale) and energy kept (green) against rank; red dashes: the chosen rank; "
       "grey dots: break-even rank (factors as large as the dense delta)",
       R"( font-size="10" fill="#555")");
  y += 44;
  y += overview(body, fig, y);
  const double col_w = (page_width - 2 * margin) / 2, row_h = 165;
  for (size_t i = 0; i < fig.panels.size(); ++i) {
    const double left = margin + col_w * static_cast<double>(i % 2);
    const double top = y + row_h * static_cast<double>(i / 2);
    panel(body, fig.panels[i], left, top, col_w);
  }
  y += row_h * static_cast<double>((fig.panels.size() + 1) / 2) + margin;
  std::string out = fmt::format(
      R"(<?xml version="1.0" encoding="UTF-8"?>)"
      "\n"
      R"(<svg xmlns="http://www.w3.org/2000/svg" width="{0:.0f}" height="{1:.0f}" viewBox="0 0 {0:.0f} {1:.0f}" font-family="sans-serif" font-size="11">)"
      "\n"
      R"(<rect width="100%" height="100%" fill="white"/>)"
      "\n",
      page_width, y);
  out += body;
  out += "</svg>\n";
  return out;
}

}  // namespace lora
