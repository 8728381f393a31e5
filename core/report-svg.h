// The rank report as a picture: a plain SVG document (text, no library) that a
// browser shows. One overview of the chosen ranks and relative errors across
// the modules in model order, then one panel per module: its singular-value
// spectrum on a log scale and the energy kept against rank, the chosen rank
// marked on both. Lays out only: the caller writes the string (cli, with
// write_file_atomic). Used by `lora extract --report` and `lora resize --report`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lora {

// One module of the figure.
struct rank_panel {
  std::string name;            // module path, shown as given (XML-escaped here)
  std::vector<double> s;       // singular values computed, descending (may be only the leading ones); >= 0
  double total_energy = 0;     // ||dW||_F^2 (the energy fraction is sum_{i<r} s_i^2 / total_energy)
  int64_t rank = 0;            // the rank chosen (0: none)
  int64_t rank_in = 0;         // resize: the rank before (0: not shown)
  int64_t rows = 0, cols = 0;  // the matrix factored
  int64_t break_even = 0;      // largest rank whose factors are no larger than the dense matrix (0: not shown)
  double error = 0;            // relative Frobenius error at `rank`
};

struct rank_figure {
  std::string title;               // first line, e.g. "lora extract: base -> tuned"
  std::string subtitle;            // second line: totals
  std::vector<rank_panel> panels;  // model order
};

// The SVG document (UTF-8 text, width 1100 px, height growing with the number
// of panels). Panels are sorted by name with digit runs read as numbers. Non-finite or non-positive singular values are
// left out of the log plot; an empty spectrum draws an empty panel. Pure; throws only std::bad_alloc.
std::string render_rank_svg(const rank_figure& figure);

}  // namespace lora
