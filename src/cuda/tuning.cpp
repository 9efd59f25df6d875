#include "cuda/tuning.hpp"

#include <atomic>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "cuda/embedded_sources.hpp"
#include "cuda/kernel_cache.hpp"
#include "cuda/settings.hpp"
#include "flashjit/flashjit.h"

namespace flashjit::cuda {
namespace {

constexpr const char* kHeader = "flashjit tuning 1";
// In save_tuning's entries: the class's built-in choice measured best (its entry is dropped).
constexpr const char* kBuiltIn = "built-in";

constexpr const char* kBackwardPrefix = "bwd_";

struct TunedChoice {
  std::string tiles;     // FLASHJIT_CUDA_TILES text (a backward class: "one-pass", "one-pass-diagonal" or "split")
  double tflops = 0;     // as measured by the tuner
  ForwardTiles parsed;   // tiles, parsed once when the file is read or saved
  int one_pass = -1;     // a backward class's pass: kSplitPass, kOnePass or kOnePassDiagonal
};

// A class's choice from its text: a forward class's tiles, parsed; a backward class's pass.
TunedChoice parse_choice(const std::string& key, const std::string& tiles, double tflops) {
  TunedChoice choice{tiles, tflops, ForwardTiles{}, -1};
  if (key.compare(0, std::string(kBackwardPrefix).size(), kBackwardPrefix) == 0) {
    if (tiles != "one-pass" && tiles != "one-pass-diagonal" && tiles != "split") {
      throw_value_error("[tuning] ", key, ": expected one-pass, one-pass-diagonal or split for a backward class, got '",
                        tiles, "'");
    }
    choice.one_pass = tiles == "split" ? kSplitPass : tiles == "one-pass" ? kOnePass : kOnePassDiagonal;
  } else {
    try {
      choice.parsed = parse_forward_tiles(tiles.c_str());
    } catch (const Error& error) {
      throw_value_error("[tuning] ", key, ": ", error.what());
    }
  }
  return choice;
}

struct TuningTable {
  std::map<std::string, TunedChoice> tiles;  // by class key
  std::string problem;                       // why the file is ignored ("" when it is used or absent)
  std::string device;                        // the built-in table's: where it was measured
  bool present = false;
};

std::mutex g_mutex;
std::map<std::string, TuningTable> g_tables;  // by file path

std::string file_name_part(const std::string& device_name) {
  std::string out;
  for (char c : device_name) {
    const bool keep = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '-';
    out += keep ? c : '_';
  }
  return out;
}

std::string tuning_path(const std::string& device_name, int arch) {
  return str_cat(cache_base_directory(), "/", fj_version(), "/tuning/sm", arch, "-", file_name_part(device_name),
                 ".txt");
}

std::string checksum_text(const std::string& body) {
  char buffer[17];
  std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(fnv1a(body)));
  return buffer;
}

// The table a tuning file's text holds, or the reason it is not used. The
// built-in table (built_in) may name any device of its arch and any version.
TuningTable parse_table(const std::string& text, const std::string& device_name, int arch, bool built_in) {
  TuningTable table;
  table.present = true;
  const size_t checksum_at = text.rfind("checksum ");
  const auto fail = [&](const std::string& why) {
    table.tiles.clear();
    table.problem = why;
    return table;
  };
  if (text.compare(0, std::string(kHeader).size(), kHeader) != 0) return fail("not a flashjit tuning file");
  if (checksum_at == std::string::npos || (checksum_at > 0 && text[checksum_at - 1] != '\n')) {
    return fail("no checksum line");
  }
  std::string stored = text.substr(checksum_at + 9);
  while (!stored.empty() && (stored.back() == '\n' || stored.back() == '\r')) stored.pop_back();
  const std::string body = text.substr(0, checksum_at);
  if (stored != checksum_text(body)) return fail("its checksum does not match its contents");
  std::istringstream lines(body);
  std::string line;
  std::getline(lines, line);  // the header
  unsigned named = 0;  // bits: the device, arch and version lines seen, each required
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string kind;
    fields >> kind;
    if (kind == "device") {
      std::string name;
      std::getline(fields >> std::ws, name);
      if (built_in) table.device = name;
      if (!built_in && name != device_name) {
        return fail(str_cat("it was measured on ", name, ", not ", device_name));
      }
      named |= 1;
    } else if (kind == "arch") {
      int value = 0;
      fields >> value;
      if (value != arch) return fail(str_cat("it is for sm_", value, ", not sm_", arch));
      named |= 2;
    } else if (kind == "version") {
      std::string version;
      fields >> version;
      if (!built_in && version != fj_version()) return fail(str_cat("it is for flashjit ", version, ", not ", fj_version()));
      named |= 4;
    } else if (kind == "entry") {
      std::string key, tiles;
      double tflops = 0;
      if (!(fields >> key >> tiles >> tflops)) return fail(str_cat("a malformed line: '", line, "'"));
      try {
        table.tiles[key] = parse_choice(key, tiles, tflops);
      } catch (const Error& error) {
        return fail(error.what());
      }
    } else if (!kind.empty()) {
      return fail(str_cat("an unknown line: '", line, "'"));
    }
  }
  if (named != 7) return fail("it does not name its device, arch and flashjit version");
  return table;
}

// The table of a tuning file; not present where there is no file.
TuningTable read_table(const std::string& path, const std::string& device_name, int arch) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return TuningTable{};  // nothing tuned
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_table(text, device_name, arch, false);
}

// The choices committed with the library for an arch (the tuner's output on one
// device of it, src/cuda/tuned_sm<arch>.txt), read once; not present for an arch without one.
const TuningTable& built_in_table(int arch) {
  static std::map<int, TuningTable> tables;  // by arch; the caller holds g_mutex
  auto found = tables.find(arch);
  if (found != tables.end()) return found->second;
  TuningTable table;
  if (arch == 90) {
    table = parse_table(embedded_source("tuned_sm90.txt"), "", arch, true);
    if (!table.problem.empty()) {
      std::fprintf(stderr, "flashjit: warning: ignoring the built-in tuning table of sm_%d: %s\n", arch,
                   table.problem.c_str());
    }
  }
  return tables.emplace(arch, std::move(table)).first->second;
}

// The built-in tables measured on one device model (src/cuda/tuned_sm<arch>_<model>.txt: the
// tuner's output there for some classes), read once: the one whose device is `device_name`, else
// nullptr. They come before the arch's table for that device.
const TuningTable* built_in_device_table(const std::string& device_name, int arch) {
  static std::map<int, std::vector<TuningTable>> tables;  // by arch; the caller holds g_mutex
  auto found = tables.find(arch);
  if (found == tables.end()) {
    std::vector<TuningTable> parsed;
    if (arch == 90) {
      TuningTable table = parse_table(embedded_source("tuned_sm90_h100.txt"), "", arch, true);
      if (!table.problem.empty()) {
        std::fprintf(stderr, "flashjit: warning: ignoring the built-in tuning table of %s: %s\n", table.device.c_str(),
                     table.problem.c_str());
      } else {
        parsed.push_back(std::move(table));
      }
    }
    found = tables.emplace(arch, std::move(parsed)).first;
  }
  for (const TuningTable& table : found->second) {
    if (table.device == device_name) return &table;
  }
  return nullptr;
}

// The table of a device, read once (the caller holds g_mutex).
const TuningTable& table_for(const std::string& device_name, int arch) {
  const std::string path = tuning_path(device_name, arch);
  auto found = g_tables.find(path);
  if (found != g_tables.end()) return found->second;
  TuningTable table = read_table(path, device_name, arch);
  if (!table.problem.empty()) {
    std::fprintf(stderr, "flashjit: warning: ignoring the tuning file %s: %s\n", path.c_str(), table.problem.c_str());
  }
  return g_tables.emplace(path, std::move(table)).first->second;
}

// A class's entry: the device's tuning file's (an empty name: none), else the built-in table of
// its device model's, else the built-in table's of its arch; nullptr where none names the class.
// The caller holds g_mutex.
const TunedChoice* tuned_entry(const std::string& device_name, int arch, const std::string& key) {
  const TuningTable* tables[3] = {device_name.empty() ? nullptr : &table_for(device_name, arch),
                                  device_name.empty() ? nullptr : built_in_device_table(device_name, arch),
                                  &built_in_table(arch)};
  for (const TuningTable* table : tables) {
    if (table == nullptr) continue;
    const auto found = table->tiles.find(key);
    if (found != table->tiles.end()) return &found->second;
  }
  return nullptr;
}

const char* band(int64_t seqlen_k) {
  static const char* const kBands[] = {"keys-2k", "keys-8k", "keys-more"};
  return kBands[tuning_band(seqlen_k)];
}

std::atomic<uint64_t> g_generation{1};

}  // namespace

std::string tuning_key(const KernelTraits& traits, int64_t seqlen_k) {
  const auto padded = [](int dim) { return (dim + 63) / 64 * 64; };
  std::string mask = "none";
  if (traits.mask == MaskKind::kBool) mask = "bool";
  if (traits.mask == MaskKind::kAdditive) mask = str_cat("add-", dtype_name(traits.mask_dtype));
  return str_cat(dtype_name(traits.dtype), "_qk", padded(traits.head_dim_qk), "_v", padded(traits.head_dim_v),
                 "_mask-", mask, traits.window ? "_window" : "", traits.dropout ? "_dropout" : "",
                 traits.softcap ? "_softcap" : "", "_", band(seqlen_k));
}

std::string backward_tuning_key(const KernelTraits& traits, int64_t seqlen_k) {
  return kBackwardPrefix + tuning_key(traits, seqlen_k);
}

int tuned_one_pass(const std::string& device_name, int arch, const std::string& key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const TunedChoice* choice = tuned_entry(device_name, arch, key);
  return choice == nullptr ? -1 : choice->one_pass;
}

int backward_pass_chosen(const KernelTraits& traits, int64_t seqlen_k, const std::string& device_name) {
  if (const std::optional<bool> forced = settings::one_pass_backward()) return *forced ? kOnePass : kSplitPass;
  if (!hopper_applies(traits)) return kSplitPass;
  return std::max(kSplitPass, tuned_one_pass(device_name, traits.arch, backward_tuning_key(traits, seqlen_k)));
}

bool one_pass_backward_chosen(const KernelTraits& traits, int64_t seqlen_k, const std::string& device_name) {
  return backward_pass_chosen(traits, seqlen_k, device_name) != kSplitPass;
}

int backward_dq_mode(int pass) {
  return pass == kOnePassDiagonal && !settings::one_pass_dq_set() ? settings::kDiagonalOnePassDq : -1;
}

ForwardTiles tuned_forward_tiles(const std::string& device_name, int arch, const std::string& key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const TunedChoice* choice = tuned_entry(device_name, arch, key);
  return choice == nullptr ? ForwardTiles{} : choice->parsed;
}

std::string save_tuning(const std::string& device_name, int arch, const std::string& entries) {
  const std::string path = tuning_path(device_name, arch);
  // The classes measured before and not measured now stay (a valid file's only).
  std::map<std::string, TunedChoice> choices = read_table(path, device_name, arch).tiles;
  std::istringstream lines(entries);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string key, tiles;
    double tflops = 0;
    if (!(fields >> key)) continue;  // a blank line
    if (!(fields >> tiles >> tflops)) {
      throw_value_error("[tuning] entries: expected lines '<key> <tiles> <TFLOP/s>', got '", line, "'");
    }
    if (tiles == kBuiltIn) {
      choices.erase(key);
      continue;
    }
    choices[key] = parse_choice(key, tiles, tflops);  // raises naming a bad one
  }
  std::string body = str_cat(kHeader, "\ndevice ", device_name, "\narch ", arch, "\nversion ", fj_version(), "\n");
  for (const auto& [key, choice] : choices) body += str_cat("entry ", key, " ", choice.tiles, " ", choice.tflops, "\n");
  make_directories(path.substr(0, path.rfind('/')));
  write_atomically(path, body + "checksum " + checksum_text(body) + "\n");
  clear_tuning();
  return path;
}

std::string describe_tuning(const std::string& device_name, int arch) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string path = tuning_path(device_name, arch);
  const TuningTable& table = table_for(device_name, arch);
  std::string out;
  if (!table.present) {
    out = str_cat(path, ": none (nothing tuned on this device)");
  } else if (!table.problem.empty()) {
    out = str_cat(path, ": ignored: ", table.problem);
  } else {
    out = str_cat(path, ": ", table.tiles.size(), " tuned classes");
    for (const auto& [key, choice] : table.tiles) out += str_cat("\n", key, " ", choice.tiles);
  }
  const TuningTable* model = built_in_device_table(device_name, arch);
  if (model != nullptr) {
    out += str_cat("\nbuilt-in for this device model (measured on ", model->device, "): ", model->tiles.size(),
                   " classes");
    for (const auto& [key, choice] : model->tiles) {
      if (table.tiles.count(key) == 0) out += str_cat("\n", key, " ", choice.tiles, " (built-in, ", model->device, ")");
    }
  }
  const TuningTable& built_in = built_in_table(arch);
  if (!built_in.present) return out + str_cat("\nbuilt-in: none for sm_", arch, " (hand-set choices)");
  if (!built_in.problem.empty()) return out + str_cat("\nbuilt-in: ignored: ", built_in.problem);
  out += str_cat("\nbuilt-in (measured on ", built_in.device, "): ", built_in.tiles.size(), " classes");
  for (const auto& [key, choice] : built_in.tiles) {
    if (table.tiles.count(key) == 0 && (model == nullptr || model->tiles.count(key) == 0)) {
      out += str_cat("\n", key, " ", choice.tiles, " (built-in)");
    }
  }
  return out;
}

void clear_tuning() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_tables.clear();
  g_generation.fetch_add(1);
}

uint64_t tuning_generation() { return g_generation.load(); }

int tuning_band(int64_t seqlen_k) { return seqlen_k <= 2048 ? 0 : seqlen_k <= 8192 ? 1 : 2; }

}  // namespace flashjit::cuda
