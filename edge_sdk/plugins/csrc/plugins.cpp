// IPluginV3 glue for the edge_sdk plugins: Int4GroupwiseGemm and EdgeAttention (contract in
// ../ops.py). Compiles unchanged against TensorRT 10.3 (JetPack 6) and 11.x headers. The library
// exports getCreators(), so it needs no libnvinfer symbols: TensorRT loads it with
// IPluginRegistry::loadLibrary before the ONNX parser maps the graph's `trt` nodes to it.
#include "kernels.h"

#include <NvInferRuntime.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace edge_sdk {
namespace {

constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "";

bool isFloat(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF; }
Dtype toDtype(DataType t) { return t == DataType::kHALF ? Dtype::kFloat16 : Dtype::kFloat32; }

// Named int32 attributes, read from and written to a PluginFieldCollection.
class Fields {
public:
    explicit Fields(std::vector<std::string> names) : mNames(std::move(names)), mValues(mNames.size(), 0) {
        for (size_t i = 0; i < mNames.size(); ++i)
            mFields.emplace_back(mNames[i].c_str(), &mValues[i], PluginFieldType::kINT32, 1);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }
    Fields(Fields const& other) : Fields(other.mNames) { mValues = other.mValues; }

    // false when a field is missing or not one int32 / int64
    bool read(PluginFieldCollection const* fc) {
        std::vector<bool> seen(mNames.size(), false);
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
            PluginField const& f = fc->fields[i];
            for (size_t j = 0; j < mNames.size(); ++j) {
                if (f.name == nullptr || mNames[j] != f.name || f.length != 1) continue;
                if (f.type == PluginFieldType::kINT32) mValues[j] = *static_cast<int32_t const*>(f.data);
                else if (f.type == PluginFieldType::kINT64) mValues[j] = static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
                else return false;
                seen[j] = true;
            }
        }
        for (bool s : seen) if (!s) return false;
        return true;
    }
    int32_t operator[](size_t i) const { return mValues[i]; }
    PluginFieldCollection const* collection() { return &mCollection; }

private:
    std::vector<std::string> mNames;
    std::vector<int32_t> mValues;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// The parts every plugin shares: capabilities, names, fields.
template <typename Derived>
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuildV2, public IPluginV3OneRuntime {
public:
    explicit PluginBase(Fields fields) : mFields(std::move(fields)) {}

    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override {
        try { return new Derived(static_cast<Derived const&>(*this)); } catch (...) { return nullptr; }
    }
    char const* getPluginName() const noexcept override { return Derived::kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t) const noexcept override {
        for (int32_t i = 0; i < nbOutputs; ++i) out[i] = in[0];
        return 0;
    }
    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override {
        return 0;
    }
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override { return 0; }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.collection(); }

protected:
    Fields mFields;
};

int64_t rows(Dims const& d) {
    int64_t m = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i) m *= d.d[i];
    return m;
}

class Int4GemmPlugin : public PluginBase<Int4GemmPlugin> {
public:
    static constexpr char const* kName = "Int4GroupwiseGemm";
    static std::vector<std::string> fieldNames() { return {"gemm_n", "gemm_k", "group_size"}; }
    using PluginBase::PluginBase;
    int32_t n() const { return mFields[0]; }
    int32_t k() const { return mFields[1]; }
    int32_t group() const { return mFields[2]; }

    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOutputs, IExprBuilder& expr) noexcept override {
        if (nbInputs != 3 || nbOutputs != 1 || in[0].nbDims < 2) return -1;
        out[0] = in[0];
        out[0].d[in[0].nbDims - 1] = expr.constant(n());
        return 0;
    }
    // x: float or half; qweight: int8; scales and y: x's type; all row-major (linear).
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != 3 || nbOutputs != 1 || io[pos].desc.format != TensorFormat::kLINEAR) return false;
        DataType const t = io[pos].desc.type;
        if (pos == 0) return isFloat(t);
        if (pos == 1) return t == DataType::kINT8;
        return t == io[0].desc.type;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return int4GemmWorkspaceBytes(rows(in[0].max), n(), k());
    }
    int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* in, void* const* out,
                    void* workspace, cudaStream_t stream) noexcept override {
        return int4Gemm(toDtype(inDesc[0].type), in[0], static_cast<int8_t const*>(in[1]), in[2], out[0],
                        rows(inDesc[0].dims), n(), k(), group(), workspace, stream) == cudaSuccess ? 0 : -1;
    }
    bool valid() const {
        return n() > 0 && n() % 8 == 0 && k() > 0 && (group() == 32 || group() == 64 || group() == 128) && k() % group() == 0;
    }
};

class AttentionPlugin : public PluginBase<AttentionPlugin> {
public:
    static constexpr char const* kName = "EdgeAttention";
    static std::vector<std::string> fieldNames() { return {"num_q_heads", "num_kv_heads", "head_size"}; }
    using PluginBase::PluginBase;
    int32_t heads() const { return mFields[0]; }
    int32_t kvHeads() const { return mFields[1]; }
    int32_t headDim() const { return mFields[2]; }

    int32_t getNbOutputs() const noexcept override { return 2; }
    // output 1 is the KV cache itself, written in place
    int32_t getAliasedInput(int32_t outputIndex) noexcept override { return outputIndex == 1 ? 1 : -1; }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                            int32_t nbOutputs, IExprBuilder& expr) noexcept override {
        if (nbInputs != 6 || nbOutputs != 2 || in[0].nbDims != 3 || in[1].nbDims != 5) return -1;
        out[0] = in[0];
        out[0].d[2] = expr.constant(static_cast<int64_t>(heads()) * headDim());
        out[1] = in[1];
        return 0;
    }
    // qkv, cache, cos, sin, q_scale and the outputs share one float type; past_lengths is int32.
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != 6 || nbOutputs != 2 || io[pos].desc.format != TensorFormat::kLINEAR) return false;
        DataType const t = io[pos].desc.type;
        if (pos == 2) return t == DataType::kINT32;
        if (pos == 0) return isFloat(t);
        return t == io[0].desc.type;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        AttentionShape const s{static_cast<int32_t>(in[0].max.d[0]), static_cast<int32_t>(in[0].max.d[1]), heads(),
                               kvHeads(), headDim(), 0};
        return attentionWorkspaceBytes(s);
    }
    int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* in, void* const* out,
                    void* workspace, cudaStream_t stream) noexcept override {
        AttentionShape const s{static_cast<int32_t>(inDesc[0].dims.d[0]), static_cast<int32_t>(inDesc[0].dims.d[1]),
                               heads(), kvHeads(), headDim(), static_cast<int32_t>(inDesc[1].dims.d[3])};
        return attention(toDtype(inDesc[0].type), s, in[0], out[1], static_cast<int32_t const*>(in[2]), in[3], in[4],
                         in[5], out[0], workspace, stream) == cudaSuccess ? 0 : -1;
    }
    bool valid() const {
        return heads() > 0 && kvHeads() > 0 && heads() % kvHeads() == 0 && headDim() > 0 && headDim() % 2 == 0 &&
               headDim() <= 256;
    }
};

template <typename Plugin>
class Creator : public IPluginCreatorV3One {
public:
    Creator() : mFields(Plugin::fieldNames()) {}
    char const* getPluginName() const noexcept override { return Plugin::kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override { return mFields.collection(); }
    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        try {
            Fields fields(Plugin::fieldNames());
            if (!fields.read(fc)) return nullptr;
            auto plugin = std::make_unique<Plugin>(fields);
            return plugin->valid() ? plugin.release() : nullptr;
        } catch (...) {
            return nullptr;
        }
    }

private:
    Fields mFields;
};

} // namespace
} // namespace edge_sdk

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static edge_sdk::Creator<edge_sdk::Int4GemmPlugin> gemm;
    static edge_sdk::Creator<edge_sdk::AttentionPlugin> attention;
    static IPluginCreatorInterface* const creators[] = {&gemm, &attention};
    nbCreators = 2;
    return creators;
}
